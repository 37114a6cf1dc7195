"""Cost of the per-step divergence check (issue 13): the time of `ds_pld.training.step.train_step` with the check
against the same step without it, in one run, interleaved (ABBA order, so drift and machine noise hit both alike).

    python benchmarks/divergence_check.py --preset bert-tiny --seq 128 --micro_batch 8 --accumulation 2 --steps 40

The check is `ds_pld.training.divergence.non_finite`: `isfinite` on the summed loss and on the gradient norm DeepSpeed
already computed, folded into the all-reduce the step makes anyway (loss, stop request, divergence flag). "Without"
replaces the step module's reference to it by a constant zero flag, so both modes make the same all-reduce and
the ratio is the check's own cost; the training code has no switch for it. The check alone is also timed over
many calls, for an absolute figure free of the step's noise. A real PretrainingRun is built from a
launch/train.py-style config (PLD off, so both modes run the same layers; no checkpoints, no evaluation, no W&B) on
the embedded default corpus.

Runs on one rank with plain python, or on several through the deepspeed launcher (rank 0 prints).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepspeed import comm as dist  # noqa: E402

from ds_pld.data import prepare_dataset  # noqa: E402
from ds_pld.timing import StepTimer  # noqa: E402
from ds_pld.training import step as training_step  # noqa: E402
from ds_pld.training.config import parse_run_config  # noqa: E402
from ds_pld.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from ds_pld.training.divergence import non_finite  # noqa: E402
from ds_pld.training.run import PretrainingRun, build_run  # noqa: E402


def bench_config(args: argparse.Namespace, data: Path, steps: int) -> dict:
    """A launch/train.py config whose steps differ only in the check: no PLD, no checkpoints, no evaluation."""
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accumulation,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "progressive_layer_drop": {"enabled": False},
        "model": {"preset": args.preset, "max_position_embeddings": max(args.seq, 32)},
        "data": {"path": str(data)},
        "training": {"max_steps": steps, "checkpoint_every": 10**9, "eval_every": 10**9, "seed": 1},
        "wandb": {"enabled": False},
    }


def timed_step(run: PretrainingRun, check: bool) -> float:
    """One optimizer step, timed from outside (the record's own step_time stops before the flag is read)."""
    zero = torch.zeros((), device=run.engine.device)
    run.guard.flag = non_finite if check else (lambda engine, loss_sum: zero)  # same all-reduce
    with StepTimer(run.engine.device) as timer:
        record, _ = training_step.train_step(run)
    if record["loss"] != record["loss"]:
        raise RuntimeError(f"the loss is NaN at step {record['step']}; the benchmark needs a finite run")
    return timer.seconds


def time_check_alone(run: PretrainingRun, calls: int = 2000) -> float:
    """Seconds per call of the check itself on the run's last step (its loss and gradient norm): the same cost
    without the step's noise around it."""
    loss_sum = torch.ones((), device=run.engine.device)
    non_finite(run.engine, loss_sum)
    with StepTimer(run.engine.device) as timer:
        for _ in range(calls):
            non_finite(run.engine, loss_sum)
    return timer.seconds / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-tiny")
    parser.add_argument("--seq", type=int, default=128, help="max_seq_length of the prepared data")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--data", default=None, help="a prepared dataset; default: the embedded corpus, prepared "
                                                     "into a temporary folder")
    args = parser.parse_args()

    init_distributed()
    rank = dist.get_rank()
    with tempfile.TemporaryDirectory(prefix="ds_pld_divergence_bench_") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            if rank == 0:
                prepare_dataset(data, vocab_size=1024, max_seq_length=args.seq, num_proc=1)
            dist.barrier()
        total = args.warmup + 2 * args.steps
        config = parse_run_config(bench_config(args, data, total))
        run = build_run(config, Path(tmp) / "out", resume=False)
        for _ in range(args.warmup):
            timed_step(run, check=True)
        times: dict[bool, list[float]] = {True: [], False: []}
        for pair in range(args.steps):
            order = (True, False) if pair % 2 == 0 else (False, True)  # ABBA
            for check in order:
                times[check].append(timed_step(run, check))
        check_s = time_check_alone(run)
        run.metrics_log.tracker.finish()
        run.checkpointing.release()
    if rank == 0:
        with_check, without = times[True], times[False]
        paired = [a / b for a, b in zip(with_check, without)]
        result = {
            "preset": args.preset, "seq": args.seq, "micro_batch": args.micro_batch,
            "accumulation": args.accumulation, "world_size": dist.get_world_size(), "steps_per_mode": args.steps,
            "median_step_s_with_check": statistics.median(with_check),
            "median_step_s_without": statistics.median(without),
            "ratio_of_medians": statistics.median(with_check) / statistics.median(without),
            "ratio_of_means": statistics.mean(with_check) / statistics.mean(without),
            "median_paired_ratio": statistics.median(paired),
            "check_alone_us": check_s * 1e6,
            "check_alone_fraction_of_step": check_s / statistics.median(without),
            "load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        }
        print(json.dumps(result, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
