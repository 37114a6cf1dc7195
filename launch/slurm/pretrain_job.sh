#!/usr/bin/env bash
# The body of launch/slurm/pretrain_{single,multi}_node.sbatch: runs inside the allocation, on its first node.
#
#     pretrain_job.sh CONFIG OUTPUT_DIR [more launch/train.py args, e.g. --max_steps 1000 --model bert-tiny]
#
# Environment (all optional):
#   DS_PLD_ROOT           the checkout (default: the directory sbatch was run from)
#   DS_PLD_PYTHON         the interpreter (default: python on PATH, as exported from the submitting shell)
#   DS_PLD_LAUNCHER       srun (default: one srun task per GPU) | deepspeed (DeepSpeed launcher + hostfile)
#   DS_PLD_HOSTFILE       deepspeed mode: a hostfile to use instead of one written from the allocation
#   DS_PLD_DS_LAUNCHER    deepspeed mode, several nodes: pdsh (default, needs ssh) | slurm | openmpi | mvapich
#   DS_PLD_MAX_RESTARTS   stop requeueing after this many restarts (default 50)
#   DS_PLD_DIST_TIMEOUT_S collective timeout: a rank waiting on a dead peer gives up after this (default 1800)
#
# Signals: SIGUSR1 (from `#SBATCH --signal=B:USR1@<secs>`, shortly before the time limit) -> the ranks get SIGUSR1,
# write a checkpoint at the next step boundary and exit 143 -> this script requeues the job, which resumes.
# SIGTERM (scancel, preemption, `scontrol requeue`) reaches the ranks from SLURM directly; they checkpoint within
# KillWait; SLURM requeues the job itself when it was preempted/requeued. Training always runs with --resume.
set -uo pipefail

log() { echo "[ds_pld slurm $(date +%H:%M:%S)] $*"; }
fail() {  # fail MESSAGE: a clear line in the job log and a non-zero exit (the job ends FAILED, no hang)
    echo "[ds_pld slurm] ERROR: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a SLURM allocation: submit with sbatch (see docs/launching.md)"
[ $# -ge 2 ] || fail "usage: sbatch <pretrain_*.sbatch> CONFIG OUTPUT_DIR [launch/train.py args]"
CONFIG=$(realpath -m -- "$1")
OUTPUT_DIR=$(realpath -m -- "$2")
shift 2
ROOT=$(realpath -m -- "${DS_PLD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}")
TRAIN="$ROOT/launch/train.py"
PYTHON=${DS_PLD_PYTHON:-python}
LAUNCHER=${DS_PLD_LAUNCHER:-srun}
NODES=${SLURM_JOB_NUM_NODES:-1}
NTASKS=${SLURM_NTASKS:-1}
RESTARTS=${SLURM_RESTART_COUNT:-0}

for arg in "$@"; do
    case $arg in
        --deepspeed_config* | --output_dir* | --resume) fail "'$arg' is set by this script; pass CONFIG and OUTPUT_DIR" ;;
    esac
done
[ -f "$TRAIN" ] || fail "no launch/train.py under '$ROOT': submit from the checkout or set DS_PLD_ROOT"
[ -f "$CONFIG" ] || fail "config '$CONFIG' does not exist on node $(hostname)"
mkdir -p "$OUTPUT_DIR" || fail "cannot create output dir '$OUTPUT_DIR' on node $(hostname)"
case $LAUNCHER in srun | deepspeed) ;; *) fail "DS_PLD_LAUNCHER='$LAUNCHER' must be srun or deepspeed" ;; esac

# Every node must see the same files (a config on node-local /tmp of the first node is a common mistake).
if [ "$NODES" -gt 1 ]; then
    # shellcheck disable=SC2016  # expanded by the bash on each node
    srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c \
        'for f in "$@"; do [ -f "$f" ] || { echo "missing on $(hostname): $f" >&2; exit 1; }; done' _ \
        "$CONFIG" "$TRAIN" || fail "the config or the checkout is not visible on every node (see above)"
fi

export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}  # as ds_pld.training.distributed derives it
LATEST="$OUTPUT_DIR/checkpoints/latest"
if [ -f "$LATEST" ]; then
    log "job $SLURM_JOB_ID restart $RESTARTS: resuming from checkpoint $(cat "$LATEST")"
else
    log "job $SLURM_JOB_ID restart $RESTARTS: no checkpoint in $OUTPUT_DIR yet, starting at step 0"
fi
TRAIN_ARGS=(--deepspeed_config "$CONFIG" --output_dir "$OUTPUT_DIR" --resume "$@")

if [ "$LAUNCHER" = srun ]; then
    # One task per GPU, ranks from SLURM_PROCID/SLURM_NTASKS; one rank exiting non-zero ends the step.
    log "srun: $NODES node(s), $NTASKS task(s): $PYTHON $TRAIN ${TRAIN_ARGS[*]}"
    CMD=(srun --kill-on-bad-exit=1 "$PYTHON" "$TRAIN" "${TRAIN_ARGS[@]}")
else
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || fail "scontrol show hostnames failed"
    FIRST=${HOSTS%%$'\n'*}
    if [ -n "${DS_PLD_HOSTFILE:-}" ]; then
        HOSTFILE=$(realpath -m -- "$DS_PLD_HOSTFILE")
        [ -f "$HOSTFILE" ] || fail "hostfile '$HOSTFILE' (DS_PLD_HOSTFILE) does not exist on node $(hostname)"
        FIRST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
        [ -n "$FIRST" ] || fail "hostfile '$HOSTFILE' names no host"
    else
        SLOTS=${SLURM_GPUS_ON_NODE:-$((NTASKS / NODES))}
        [ "$SLOTS" -gt 0 ] 2>/dev/null || SLOTS=$((NTASKS / NODES))
        HOSTFILE="$OUTPUT_DIR/hostfile.$SLURM_JOB_ID"
        # shellcheck disable=SC2086  # one line per host: splitting the list is the point
        printf '%s slots='"$SLOTS"'\n' $HOSTS > "$HOSTFILE"
    fi
    getent hosts "$FIRST" >/dev/null || FIRST=$(scontrol show node -o "$FIRST" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    HOST_COUNT=$(grep -cEv '^[[:space:]]*(#|$)' "$HOSTFILE")
    DS_LAUNCHER=${DS_PLD_DS_LAUNCHER:-pdsh}
    DS_ARGS=(--hostfile "$HOSTFILE" --master_addr "$FIRST" --master_port "$MASTER_PORT" --launcher "$DS_LAUNCHER")
    # One host runs locally; the slurm launcher uses srun: neither needs the ssh check.
    if [ "$HOST_COUNT" -le 1 ] || [ "$DS_LAUNCHER" != pdsh ]; then DS_ARGS+=(--no_ssh_check); fi
    log "deepspeed launcher ($DS_LAUNCHER) with hostfile $HOSTFILE: $(tr '\n' ' ' < "$HOSTFILE")"
    CMD=("$PYTHON" -m deepspeed.launcher.runner "${DS_ARGS[@]}" "$TRAIN" "${TRAIN_ARGS[@]}")
fi

REQUEUE=0
CANCELLED=0
CHILD=
descendants() {  # descendants PID: every process below PID (by parent pid)
    local pid
    for pid in $(pgrep -P "$1"); do
        echo "$pid"
        descendants "$pid"
    done
}
stop_ranks() {
    # SIGUSR1 to the ranks: they checkpoint at the next step boundary and exit 143. Not SIGTERM: a signal for the
    # ranks reaches every process of their job step, and W&B's service process ignores SIGUSR1 but dies on SIGTERM.
    if [ "$LAUNCHER" = srun ] || [ "${DS_PLD_DS_LAUNCHER:-pdsh}" = slurm ]; then
        scancel --signal=USR1 "$SLURM_JOB_ID"  # all job steps, not this batch shell
    elif [ -n "$CHILD" ]; then
        local pid cmd signalled=0
        for pid in $(descendants "$CHILD"); do  # the ranks the DeepSpeed launcher started on this node
            cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || continue
            case $cmd in
                *deepspeed.launcher*) ;;
                *"$TRAIN"*) kill -USR1 "$pid" 2>/dev/null && signalled=$((signalled + 1)) ;;
            esac
        done
        if [ "$HOST_COUNT" -gt 1 ]; then
            log "WARNING: ranks on other nodes (pdsh) cannot be reached; stopping the launcher, which kills them" \
                "without a checkpoint: use DS_PLD_LAUNCHER=srun for graceful requeue on several nodes"
            kill -TERM "$CHILD" 2>/dev/null
        fi
        log "sent SIGUSR1 to $signalled local rank(s)"
    fi
}
on_usr1() {
    log "SIGUSR1: the time limit is close; the ranks checkpoint now, then the job requeues itself"
    REQUEUE=1
    stop_ranks
}
on_term() {
    log "SIGTERM (scancel, preemption or requeue): the ranks checkpoint at their next step boundary"
    CANCELLED=1
    # Nothing to forward: SLURM signals the ranks itself (in deepspeed mode the launcher passes it on as well, so the
    # ranks there get it twice and exit at once, without a new checkpoint; see docs/launching.md).
}
trap on_usr1 USR1
trap on_term TERM

"${CMD[@]}" &
CHILD=$!
while :; do  # `wait` returns early when a trapped signal arrives: wait again until the launcher has exited
    wait "$CHILD"
    rc=$?
    kill -0 "$CHILD" 2>/dev/null || break
done
if [ "$rc" -gt 128 ]; then  # the signal may have raced the exit: ask once more for the real status
    wait "$CHILD" 2>/dev/null
    again=$?
    [ "$again" = 127 ] || rc=$again
fi

if [ "$rc" = 0 ]; then
    log "training finished (exit 0)"
    exit 0
fi
# After the time-limit warning the job continues from the last complete checkpoint, however the ranks ended (the
# trainer exits 143, srun reports 143 for a rank it had to terminate, the DeepSpeed launcher 1). A crash unrelated to
# the warning happens before it and is not requeued.
if [ "$REQUEUE" = 1 ] && [ "$CANCELLED" = 0 ]; then
    if [ ! -f "$LATEST" ]; then
        echo "[ds_pld slurm] ERROR: stopped for the time limit (exit $rc) before any checkpoint was written;" \
            "not requeueing (lower training.checkpoint_every or raise --time)" >&2
        exit "$rc"
    fi
    if [ "$RESTARTS" -ge "${DS_PLD_MAX_RESTARTS:-50}" ]; then
        log "stopped for the time limit after $RESTARTS restarts (DS_PLD_MAX_RESTARTS); not requeueing"
        exit "$rc"
    fi
    log "training stopped (exit $rc) at checkpoint $(cat "$LATEST"); requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed"; exit "$rc"; }
    exit 0
fi
if [ "$CANCELLED" = 1 ]; then
    log "training stopped (exit $rc) after SIGTERM; a preempted or requeued job resumes from $(cat "$LATEST" 2>/dev/null)"
    exit "$rc"
fi
echo "[ds_pld slurm] ERROR: training failed with exit code $rc on job $SLURM_JOB_ID (see the errors above;" \
    "a ConfigError names the config key); not requeueing" >&2
exit "$rc"
