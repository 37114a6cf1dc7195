#!/usr/bin/env bash
# The GPU suite: everything ds-pld has to check or measure on a GPU, as ONE command for a bare single-GPU machine,
# finishing within its time budget (default 480 s) and writing results.json + results.md (docs/kernels.md).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]              # on the GPU; OUT_DIR defaults to $OUT, else runs/gpu_suite
#   bash benchmarks/gpu_suite.sh --dry-run [OUT_DIR]    # on the CPU (CI): plans every step, runs the CPU-runnable
#                                                       # parts (CPU stand-ins, recorded as such)
#   options: --budget-s S (total seconds, default 480)  --only step1,step2 (run only these steps)
#
# Steps, in order, each in its own process group with a hard timeout, so one failure or hang loses only itself:
#   setup (carried wheels), env, kernel_tests (compiled, vs the torch reference, fp32 + bf16, forward + backward),
#   lamb_vs_fused (ours vs deepspeed.ops.lamb.FusedLamb, 20 steps), data, configs, train_pld, train_earlybert,
#   train_resume (deepspeed --num_gpus 1 launch/train.py: bf16, ZeRO-2, the fused optimizers), throughput
#   (benchmarks/gpu_throughput.py, bert-base seq 128 bf16), profile (torch.profiler top ops), time_to_quality
#   (only if benchmarks/time_to_quality.py exists; gets the time that is left).
# Time left is shared so the early steps cannot starve the throughput and profile steps (THROUGHPUT_MIN_S below).
# Big files (data, checkpoints) go to a scratch folder ($GPU_SUITE_WORK or a mktemp dir), never under OUT_DIR.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY=0
BUDGET_S=480
ONLY=""
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --budget-s=*) BUDGET_S="${1#*=}" ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_suite: unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/runs/gpu_suite}}"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/artifacts" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
ART="$OUT_DIR/artifacts"
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"
rm -f "$OUT_DIR/results.json" "$OUT_DIR/results.md"
WORK="${GPU_SUITE_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}"
mkdir -p "$WORK"
PY="${PYTHON:-python3}"
TOOLS="$ROOT/benchmarks/gpu_suite_tools.py"
STARTED="$(date +%Y-%m-%dT%H:%M:%S%z)"
START_S=$(date +%s)
DEADLINE=$((START_S + BUDGET_S))
REPORT_S=15          # kept free for the report at the end
DRY_CAP_S=400        # per-step limit in dry mode (CPU stand-ins; no shared budget)
THROUGHPUT_MIN_S=100 # the MFU figure is the suite's main measurement: earlier steps leave it this much
PROFILE_MIN_S=40
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ]; then unset TRITON_INTERPRET; fi
MODE=$([ "$DRY" = 1 ] && echo dry-run || echo gpu)
ALL_STEPS="setup env kernel_tests lamb_vs_fused data configs train_pld train_earlybert train_resume throughput profile \
time_to_quality"
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || { echo "gpu_suite: --budget-s needs whole seconds, got $BUDGET_S" >&2; exit 2; }
for name in ${ONLY//,/ }; do
  [[ " $ALL_STEPS " == *" $name "* ]] || { echo "gpu_suite: --only: no step $name (steps: $ALL_STEPS)" >&2; exit 2; }
done
declare -A STATUS

log() { echo "[gpu_suite] $*"; }
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
left_s() { echo $((DEADLINE - $(date +%s))); }

record() {  # record NAME STATUS REASON [GPU_COMMAND]: a step that does not run (planned or skipped)
  STATUS[$1]=$2
  "$PY" "$TOOLS" record "$1" --steps-file "$STEPS" --status "$2" --reason "$3" --gpu-command "${4:-}"
}

# step NAME CAP_S MIN_S RESERVE_S GPU_CMD DRY_CMD DRY_NOTE [GPU_NOTE]
#   GPU run: GPU_CMD with timeout min(CAP_S, time left - RESERVE_S - REPORT_S); skipped when that is under MIN_S.
#   Dry run: DRY_CMD (a CPU stand-in, noted as DRY_NOTE) when given, else the step is recorded as planned with
#   DRY_NOTE as the reason. GPU_NOTE is recorded with a GPU run. Commands are bash strings.
step() {
  local name=$1 cap=$2 min=$3 reserve=$4 gpu_cmd=$5 dry_cmd=$6 dry_note=$7 timeout cmd note=${8:-}
  if ! wanted "$name"; then record "$name" skipped "not selected by --only $ONLY" "$gpu_cmd"; return; fi
  if [ "$DRY" = 1 ]; then
    if [ -z "$dry_cmd" ]; then record "$name" planned "$dry_note" "$gpu_cmd"; return; fi
    cmd=$dry_cmd; note="dry run, CPU stand-in: $dry_note"; timeout=$DRY_CAP_S
  else
    cmd=$gpu_cmd
    timeout=$(( $(left_s) - reserve - REPORT_S ))
    [ "$timeout" -gt "$cap" ] && timeout=$cap
    if [ "$timeout" -lt "$min" ]; then
      [ "$timeout" -lt 0 ] && timeout=0
      record "$name" skipped "only ${timeout} s of the ${BUDGET_S} s budget left for it; it needs at least ${min} s" \
        "$gpu_cmd"
      return
    fi
  fi
  log "step $name (limit ${timeout} s)"
  "$PY" "$TOOLS" run-step "$name" --steps-file "$STEPS" --log "$OUT_DIR/logs/$name.log" --timeout "$timeout" \
    --gpu-command "$gpu_cmd" ${note:+--note "$note"} -- bash -c "set -o pipefail; $cmd"
  case $? in
    0) STATUS[$name]=ok ;;
    1) STATUS[$name]=failed ;;  # recorded by run-step
    *) STATUS[$name]=failed     # run-step itself broke: the step still gets a record
       "$PY" "$TOOLS" record "$name" --steps-file "$STEPS" --status failed --gpu-command "$gpu_cmd" \
         --reason "benchmarks/gpu_suite_tools.py run-step failed before recording the step" ;;
  esac
}

needs() {  # needs NAME GPU_CMD DEP...: record NAME as skipped (return 1) unless it is wanted and every DEP succeeded
  local name=$1 gpu_cmd=$2 dep
  shift 2
  if ! wanted "$name"; then record "$name" skipped "not selected by --only $ONLY" "$gpu_cmd"; return 1; fi
  for dep in "$@"; do
    if [ "${STATUS[$dep]:-}" != ok ]; then
      record "$name" skipped "needs step $dep, which did not succeed (${STATUS[$dep]:-not run})" "$gpu_cmd"
      return 1
    fi
  done
}

finish() {
  trap - TERM INT
  "$PY" "$TOOLS" report "$OUT_DIR" --mode "$MODE" --started "$STARTED" $([ "$DRY" = 0 ] && echo --budget-s "$BUDGET_S")
  local rc=$?
  [ -f "$OUT_DIR/results.md" ] && cat "$OUT_DIR/results.md"
  log "scratch files (data, checkpoints) in $WORK; total $(( $(date +%s) - START_S )) s"
  exit $rc
}
trap 'log "interrupted: writing the results so far"; finish' TERM INT

log "mode $MODE, budget ${BUDGET_S} s, results in $OUT_DIR, scratch in $WORK"

# --- setup: the wheels made by shared/device/make-wheels.sh (DeepSpeed, pydantic, hjson, datasets, ...) -----------
SITE="${GPU_SUITE_SITE:-/tmp/site}"
SETUP_CMD="\"$PY\" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target \"$SITE\" \
\"$ROOT\"/.whl/*.whl"
if ! wanted setup; then
  record setup skipped "not selected by --only $ONLY" "$SETUP_CMD"
elif "$PY" -c "import deepspeed, datasets, hjson, pydantic" >/dev/null 2>&1; then
  record setup skipped "deepspeed, datasets, hjson and pydantic are already importable: nothing to install" \
    "$SETUP_CMD"
elif ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  record setup skipped "deepspeed is not importable and there is no .whl folder to install it from \
(run shared/device/make-wheels.sh and carry .whl); the steps that need it will fail" "$SETUP_CMD"
elif [ "$DRY" = 1 ]; then
  record setup planned "would install the carried wheels into $SITE and put it on PYTHONPATH" "$SETUP_CMD"
else
  step setup 90 20 $((THROUGHPUT_MIN_S + PROFILE_MIN_S)) "$SETUP_CMD" "" ""
  [ "${STATUS[setup]}" = ok ] && export PYTHONPATH="$SITE:$PYTHONPATH"
fi

# --- env: what the figures are measured on --------------------------------------------------------------------------
ENV_CMD="\"$PY\" \"$TOOLS\" env --out \"$ART/env.json\""
step env 60 10 0 "$ENV_CMD" "$ENV_CMD" "the same command (records the CPU environment)"

# --- kernel_tests: tests/test_kernels.py on CUDA tensors (compiled Triton) --------------------------------------
# The interpreter child and the benchmark smoke test are CPU tests; on the GPU every remaining case must run.
KSEL="not under_triton_interpreter and not cpu_smoke"
KERNEL_CMD="\"$PY\" -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k \"$KSEL\" \
--junitxml \"$ART/kernel_tests.xml\"; rc=\$?; \"$PY\" \"$TOOLS\" junit-check \"$ART/kernel_tests.xml\" \
--out \"$ART/kernel_tests.json\" --max-skipped 0 && exit \$rc"
KERNEL_DRY="\"$PY\" -m pytest -q -p no:cacheprovider --collect-only tests/test_kernels.py -k \"$KSEL\" | tail -n 3"
step kernel_tests 150 30 $((THROUGHPUT_MIN_S + PROFILE_MIN_S)) "$KERNEL_CMD" "$KERNEL_DRY" \
  "collects the compiled kernel cases (they need CUDA; on the CPU they run under TRITON_INTERPRET=1 in tests/test_kernels.py)"

# --- lamb_vs_fused -------------------------------------------------------------------------------------------------
LAMB_CMD="\"$PY\" benchmarks/lamb_vs_fused.py --device cuda --reference fused --steps 20 --json \"$ART/lamb_vs_fused.json\""
LAMB_DRY="\"$PY\" benchmarks/lamb_vs_fused.py --device cpu --reference torch --small --steps 20 \
--json \"$ART/lamb_vs_fused.json\""
step lamb_vs_fused 120 20 $((THROUGHPUT_MIN_S + PROFILE_MIN_S)) "$LAMB_CMD" "$LAMB_DRY" \
  "FusedLamb is a CUDA extension: ours is compared with the fp32 transcription of its kernel instead"

# --- data, configs and the training runs --------------------------------------------------------------------------
# Shrunk copies of the real recipes (train.py has flags for steps and model only): one GPU, bf16, ZeRO-2. The GPU
# commands are built even in a dry run, so the plan records exactly what the GPU will run.
DATA="$WORK/data"
PLD_RUN="$WORK/train_pld"
EB_RUN="$WORK/train_earlybert"
OPT_SETS=""
OPT_NOTE=""
if [ "$DRY" = 0 ] && [ -z "$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' \
    2>/dev/null)" ]; then
  # DeepSpeed JIT-builds FusedAdam with nvcc; without a CUDA toolkit the run would only show that failure.
  OPT_SETS="--set optimizer.params.torch_adam=true"
  OPT_NOTE="no CUDA toolkit (nvcc) for DeepSpeed's JIT ops: trained with torch.optim.AdamW (torch_adam), not FusedAdam"
fi

training_commands() {  # training_commands gpu|dry: sets DATA_CMD CONFIG_CMD PLD_CMD EB_CMD RESUME_CMD and sizes
  local seq vocab micro model_flag eval sets eb_sets launch summary
  if [ "$1" = dry ]; then
    seq=64; vocab=2048; micro=8; model_flag="--model bert-tiny"; MAX=6; STOP=4; DRAW=2; eval=3
  else
    seq=128; vocab=30522; micro=64; model_flag=""; MAX=30; STOP=20; DRAW=10; eval=10
  fi
  SIZES="seq $seq, vocab $vocab"
  DATA_CMD="\"$PY\" launch/prepare_data.py --output_dir \"$DATA\" --max_seq_length $seq --vocab_size $vocab"
  sets="--set train_batch_size=$micro --set train_micro_batch_size_per_gpu=$micro --set gradient_accumulation_steps=1 \
--set bf16.enabled=true --set zero_optimization.stage=2 --set data.max_seq_length=$seq --set training.max_steps=$MAX \
--set training.checkpoint_every=$eval --set training.eval_every=$eval --set training.eval_batches=2 \
--set training.keep_checkpoints=1 --set wandb.enabled=false $OPT_SETS"
  eb_sets="--set earlybert.draw_at_step=$DRAW --set earlybert.check_every=1 --set earlybert.window=2 \
--set earlybert.max_search_steps=$DRAW"
  CONFIG_CMD="\"$PY\" \"$TOOLS\" derive ds_configs/pld.json \"$ART/pld_suite.json\" $sets && \
\"$PY\" \"$TOOLS\" derive ds_configs/pld_earlybert.json \"$ART/pld_earlybert_suite.json\" $sets $eb_sets"
  # The deepspeed launcher through its module (what the `deepspeed` CLI runs; a --target install has no CLI).
  launch="\"$PY\" -m deepspeed.launcher.runner --num_gpus 1 --master_port \$((29500 + RANDOM % 2000)) launch/train.py \
--data \"$DATA\" $model_flag"
  summary="\"$PY\" \"$TOOLS\" train-summary --copy-metrics"
  PLD_CMD="$launch --deepspeed_config \"$ART/pld_suite.json\" --output_dir \"$PLD_RUN\" --max_steps $MAX && \
$summary \"$PLD_RUN\" --out \"$ART/train_pld.json\" --expect-last-step $MAX"
  EB_CMD="$launch --deepspeed_config \"$ART/pld_earlybert_suite.json\" --output_dir \"$EB_RUN\" --max_steps $MAX \
--stop_at_step $STOP && $summary \"$EB_RUN\" --out \"$ART/train_earlybert.json\" --expect-last-step $STOP \
--expect-drawn --expect-pruned"
  RESUME_CMD="$launch --deepspeed_config \"$ART/pld_earlybert_suite.json\" --output_dir \"$EB_RUN\" --max_steps $MAX \
--resume && $summary \"$EB_RUN\" --out \"$ART/train_resume.json\" --expect-last-step $MAX --expect-drawn --expect-pruned"
}
training_commands gpu
G_DATA=$DATA_CMD G_CONFIG=$CONFIG_CMD G_PLD=$PLD_CMD G_EB=$EB_CMD G_RESUME=$RESUME_CMD
training_commands dry
D_DATA=$DATA_CMD D_CONFIG=$CONFIG_CMD D_PLD=$PLD_CMD D_EB=$EB_CMD D_RESUME=$RESUME_CMD
D_SIZES=$SIZES D_MAX=$MAX D_STOP=$STOP D_DRAW=$DRAW
TRAIN_RESERVE=$((THROUGHPUT_MIN_S + PROFILE_MIN_S))
TRAIN_NOTE="the same launcher and trainer on the CPU (gloo), bert-tiny, $D_MAX steps"

step data 90 15 $TRAIN_RESERVE "$G_DATA" "$D_DATA" "the same command at $D_SIZES (the embedded corpus)"
step configs 60 10 $TRAIN_RESERVE "$G_CONFIG" "$D_CONFIG" \
  "the same derivation at the CPU sizes (bert-tiny, $D_SIZES, batch 8, $D_MAX steps), validated by the trainer's parser"
# Dry run: train_earlybert runs the same launcher and trainer with PLD on (its config is pld_earlybert's), so
# train_pld is only planned there (one launcher run fewer in CI).
needs train_pld "$G_PLD" data configs &&
  step train_pld 150 40 $TRAIN_RESERVE "$G_PLD" "" \
    "planned only in a dry run: train_earlybert runs the same launcher and trainer with PLD on" "$OPT_NOTE"
needs train_earlybert "$G_EB" data configs &&
  step train_earlybert 120 40 $TRAIN_RESERVE "$G_EB" "$D_EB" \
    "$TRAIN_NOTE: draws a ticket at step $D_DRAW and stops at $D_STOP" "$OPT_NOTE"
needs train_resume "$G_RESUME" train_earlybert &&
  step train_resume 100 30 $TRAIN_RESERVE "$G_RESUME" "$D_RESUME" \
    "$TRAIN_NOTE: resumes the pruned EarlyBERT run from step $D_STOP" "$OPT_NOTE"

# --- throughput and MFU ------------------------------------------------------------------------------------------
TP_CMD="\"$PY\" benchmarks/gpu_throughput.py --preset bert-base --seq-len 128 --precision bf16 \
| tee \"$ART/throughput.md\""
TP_DRY="TRITON_INTERPRET=1 \"$PY\" benchmarks/gpu_throughput.py --cpu-smoke | tee \"$ART/throughput.md\""
step throughput 150 60 $PROFILE_MIN_S "$TP_CMD" "$TP_DRY" "--cpu-smoke (bert-tiny, Triton rows interpreted; no figures)"

# --- profile: top ops of bert-base training steps ----------------------------------------------------------------
PROF_CMD="\"$PY\" \"$TOOLS\" profile --device cuda --preset bert-base --batch-size 128 --seq-len 128 --kernels auto \
--out \"$ART/profile.json\""
PROF_DRY="\"$PY\" \"$TOOLS\" profile --device cpu --preset bert-tiny --batch-size 2 --seq-len 16 --kernels torch \
--warmup 1 --steps 1 --out \"$ART/profile.json\""
step profile 90 20 0 "$PROF_CMD" "$PROF_DRY" "bert-tiny on the CPU (self CPU time)"

# --- time to quality (another issue's script): whatever time is left ---------------------------------------------
TTQ=benchmarks/time_to_quality.py
if ! wanted time_to_quality; then
  record time_to_quality skipped "not selected by --only $ONLY" ""
elif [ ! -f "$TTQ" ]; then
  record time_to_quality skipped "$TTQ does not exist in this checkout" ""
else
  TTQ_HELP="$(timeout 60 "$PY" "$TTQ" --help 2>&1)"
  has_flag() { grep -q -- "$1" <<<"$TTQ_HELP"; }
  if ! has_flag --device || ! has_flag --out; then
    record time_to_quality skipped "$TTQ --help lists no --device/--out flags: not run" ""
  else
    TTQ_MIN=$(( ($(left_s) - REPORT_S - 60) / 60 ))
    [ "$TTQ_MIN" -lt 1 ] && TTQ_MIN=1
    # Its runs write data and checkpoints into --out: that goes to the scratch folder, and only its small result
    # files (JSON, Markdown, PNG) are copied to OUT_DIR/ttq, so the results folder stays small enough to fetch.
    TTQ_CMD="\"$PY\" $TTQ --device cuda --out \"$WORK/ttq\""
    # Sized by --minutes when the script has it; otherwise its defaults run under the step's time limit.
    has_flag --minutes && TTQ_CMD="$TTQ_CMD --minutes $TTQ_MIN"
    has_flag --bf16 && TTQ_CMD="$TTQ_CMD --bf16"
    has_flag --data && [ "${STATUS[data]:-}" = ok ] && TTQ_CMD="$TTQ_CMD --data \"$DATA\""
    TTQ_CMD="$TTQ_CMD; rc=\$?; mkdir -p \"$OUT_DIR/ttq\"; find \"$WORK/ttq\" -maxdepth 1 -type f \\( -name '*.json' \
-o -name '*.md' -o -name '*.png' \\) -size -8M -exec cp {} \"$OUT_DIR/ttq/\" \\; ; exit \$rc"
    # Dry run: planned only. Its CPU --smoke takes minutes on a small machine and is that script's own test.
    step time_to_quality 600 90 0 "$TTQ_CMD" "" \
      "its --help was checked for the flags used; the run needs the GPU (its --smoke mode is tested on its own)"
  fi
fi

finish
