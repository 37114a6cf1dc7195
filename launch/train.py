"""BERT pretraining with Progressive Layer Dropping (and EarlyBERT / LAMB when configured).

    deepspeed launch/train.py --deepspeed_config ds_configs/pld.json --output_dir runs/pld
    python launch/train.py --deepspeed_config ds_configs/cpu_small.json --output_dir runs/quick   # one rank
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.config import parse_config  # noqa: E402
from ds_pld.config_errors import ConfigError  # noqa: E402
from ds_pld.models import build_bert_config  # noqa: E402
from ds_pld.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from ds_pld.training.run import CannotRollBack, TrainingDiverged, build_run  # noqa: E402
from ds_pld.training.stop import StopRequest, deepspeed_launchers  # noqa: E402

EXIT_CONFIG = 2  # a config or usage error: one line from rank 0, no traceback
EXIT_DIVERGED = 3  # the loss or gradient norm stopped being finite; nothing was saved from those weights
EXIT_STOPPED = 143  # stopped by a signal, after a checkpoint
RANK_ENV = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True, help="ds_configs JSON (DeepSpeed + our blocks)")
    parser.add_argument("--output_dir", required=True, help="checkpoints, metrics.jsonl, curves.png, final/")
    parser.add_argument("--max_steps", type=int, help="overrides training.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint, if any")
    parser.add_argument("--stop_at_step", type=int, help="checkpoint and exit at this step (chunked jobs)")
    parser.add_argument("--seed", type=int, help="overrides training.seed")
    parser.add_argument("--model", help="model preset name (bert-base, bert-tiny, ...) overriding the config's")
    parser.add_argument("--data", help="a folder written by launch/prepare_data.py (overrides data.path)")
    parser.add_argument("--replan_schedule", action="store_true",
                        help="on --resume with another --max_steps, plan the LR schedule for the new max_steps "
                             "(default: keep the schedule the run started with)")
    parser.add_argument("--allow_world_size_change", action="store_true",
                        help="resume a checkpoint written by another number of ranks (the loss curve will differ)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace):
    config = parse_config(args.deepspeed_config)
    training = {k: v for k, v in (("max_steps", args.max_steps), ("seed", args.seed)) if v is not None}
    return dataclasses.replace(
        config,
        training=dataclasses.replace(config.training, **training),
        model=build_bert_config(args.model) if args.model else config.model,
        data=dataclasses.replace(config.data, path=args.data) if args.data else config.data)


def launch_rank() -> int:
    """This process's rank before (or without) a process group, from whichever launcher started it."""
    from deepspeed import comm as dist

    if dist.is_initialized():
        return dist.get_rank()
    return next((int(os.environ[key]) for key in RANK_ENV if os.environ.get(key, "").isdigit()), 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except ConfigError as err:  # the same error on every rank: say it once
        if launch_rank() == 0:
            print(f"ConfigError: {err}", file=sys.stderr, flush=True)
        if "mpi4py.MPI" in sys.modules:
            # An error raised on one rank only (e.g. rank 0 preparing the data) leaves the others in a collective,
            # and MPI_Finalize at interpreter exit would wait for them for good: leave unfinalized, so mpirun ends
            # them (what an uncaught exception does; see ds_pld.training.distributed).
            sys.stdout.flush()
            os._exit(EXIT_CONFIG)
        return EXIT_CONFIG


def train(args: argparse.Namespace) -> int:
    config = load_config(args)  # all config errors surface here, before any process group or data work
    init_distributed()
    run = build_run(config, args.output_dir, resume=args.resume, replan_schedule=args.replan_schedule,
                    allow_world_size_change=args.allow_world_size_change)
    cfg = config.training
    bar = tqdm(total=run.max_steps, initial=run.step, disable=run.rank != 0, dynamic_ncols=True, desc="pretrain")
    with StopRequest(watch=deepspeed_launchers()) as stop:
        run.save_rewind_point()
        while run.step < run.max_steps:
            try:
                record, stopping = run.train_step(stop.requested or run.step + 1 == args.stop_at_step)
            except TrainingDiverged as err:
                try:
                    message = run.roll_back()
                except CannotRollBack as refusal:
                    run.log(err.record)
                    bar.close()
                    if run.rank == 0:
                        why = "" if cfg.on_divergence == "stop" else f" (no rollback: {refusal})"
                        print(f"error: {err}{why}", file=sys.stderr, flush=True)
                    run.tracker.finish()
                    shutdown_distributed()
                    return EXIT_DIVERGED
                if run.rank == 0:
                    bar.write(f"[ds_pld] training diverged at step {err.step}; {message}")
                bar.n = run.step
                continue
            if run.step % cfg.eval_every == 0 or run.step == run.max_steps:
                record.update(run.evaluate())
            run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", theta=f"{record['pld_theta'] or 1:.3f}",
                            samples_s=f"{record['samples_per_sec']:.1f}")
            if stopping or run.step % cfg.checkpoint_every == 0 or run.step == run.max_steps:
                run.save_checkpoint()
            if stopping and run.step < run.max_steps:  # a stop at the last step just finishes
                run.tracker.finish()
                why = f" ({stop.launcher_gone})" if stop.launcher_gone else ""
                bar.write(f"stopped at step {run.step}{why}; continue with --resume")
                shutdown_distributed()
                # After the launcher's death nobody reads the status, and a non-zero one would make a surviving
                # deepspeed.launcher.launch SIGTERM the other ranks (and their W&B service) while they finish.
                return EXIT_STOPPED if stop.signal is not None else 0
    bar.close()
    final = run.finish()
    if final is not None:
        print(f"done: {run.step} steps; model in {final}, metrics in {Path(args.output_dir) / 'metrics.jsonl'}")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
