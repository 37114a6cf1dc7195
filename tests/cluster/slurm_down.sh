#!/usr/bin/env bash
# Stop the cluster tests/cluster/slurm_up.sh DIR started: cancel its leftover jobs, then stop slurmd, slurmctld and
# munged by the pid files under DIR/run (never by process name, so a system SLURM on the same machine is untouched).
set -uo pipefail

DIR=${1:?usage: slurm_down.sh DIR}
export SLURM_CONF="$DIR/slurm.conf"
PATH=$PATH:/usr/sbin

if [ -f "$DIR/run/slurmctld.pid" ] && command -v scancel >/dev/null 2>&1; then
    scancel --full --signal=KILL --state=RUNNING -u root >/dev/null 2>&1 || true
    scancel -u root >/dev/null 2>&1 || true
    # Wait (bounded) until no job is left, so slurmd does not leave orphaned job steps behind.
    for _ in $(seq 1 30); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 1
    done
fi

stop() {  # stop PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"
stop "$DIR/run/munged.pid"
echo "SLURM down ($DIR)"
