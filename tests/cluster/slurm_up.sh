#!/usr/bin/env bash
# Start a real single-node SLURM cluster (munged + slurmctld + slurmd, as root) whose every file lives under DIR:
#
#     tests/cluster/slurm_up.sh DIR      # then: export SLURM_CONF=DIR/slurm.conf
#     tests/cluster/slurm_down.sh DIR
#
# Nothing under /etc or /run is touched: munged gets its own key and socket, the daemons their own ports, so this can
# run next to (or instead of) a system SLURM. Used by tests/test_slurm.py; also handy to try launch/slurm/ by hand.
# No systemd needed: the daemons daemonize and write pid files under DIR/run, which slurm_down.sh uses.
# Exit status 2 = this machine cannot run the cluster (not root, tools missing); anything else non-zero = a failure.
set -euo pipefail

DIR=${1:?usage: slurm_up.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [ "$(id -u)" != 0 ]; then
    echo "slurm_up.sh: needs root (slurmd runs jobs as their submitting user and munged/slurmd need their own dirs)" >&2
    exit 2
fi
for tool in munged mungekey slurmctld slurmd sinfo scontrol; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] \
        || { echo "slurm_up.sh: $tool not found (run tests/cluster/install_slurm.sh)" >&2; exit 2; }
done
PATH=$PATH:/usr/sbin

# munged insists that every directory on its socket path is executable by all and not group/world writable.
chmod 755 "$DIR"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
chmod 755 "$DIR/munge"
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
SOCKET="$DIR/munge/munge.socket"

NODE=$(hostname -s)
CPUS=$(nproc)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
while [ "$SLURMD_PORT" = "$CTLD_PORT" ]; do SLURMD_PORT=$(free_port); done

# NodeAddr/SlurmctldHost address 127.0.0.1: the node need not resolve its own hostname.
# cred_expire=5: a requeued job may start again after ~5 s instead of the default 120 s; sched_interval=2 and
# bf_interval=2: the scheduler notices that at once (defaults 60 s / 30 s).
# KillWait=30: SIGTERM -> SIGKILL grace on scancel/requeue/time limit, time for the training to checkpoint.
# MinJobAge=3600: finished jobs stay visible to `scontrol show job` for the tests.
cat > "$DIR/slurm.conf" <<CONF
ClusterName=dspldtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
: > "$DIR/plugstack.conf"  # no SPANK plugins from the system config
# No cgroup.conf: with proctrack/linuxproc and task/none slurmd 22.05 needs none (and rejects CgroupPlugin=disabled).

/usr/sbin/munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
export SLURM_CONF="$DIR/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF" -i
/usr/sbin/slurmd -f "$SLURM_CONF" -N "$NODE"

# Wait (bounded) for the node to register and go idle.
for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "SLURM up: node $NODE idle ($CPUS CPUs), SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm_up.sh: node $NODE did not become idle within 60 s (state: '${state:-none}'); logs in $DIR/log" >&2
tail -n 20 "$DIR/log/"*.log >&2 || true
exit 1
