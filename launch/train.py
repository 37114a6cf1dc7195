"""BERT pretraining with Progressive Layer Dropping (and EarlyBERT / LAMB when configured).

    deepspeed launch/train.py --deepspeed_config ds_configs/pld.json --output_dir runs/pld
    python launch/train.py --deepspeed_config ds_configs/cpu_small.json --output_dir runs/quick   # one rank
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.config import parse_config  # noqa: E402
from ds_pld.models import build_bert_config  # noqa: E402
from ds_pld.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from ds_pld.training.run import build_run  # noqa: E402
from ds_pld.training.stop import StopRequest  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args)  # all config errors surface here, before any process group or data work
    init_distributed()
    run = build_run(config, args.output_dir, resume=args.resume)
    cfg = config.training
    bar = tqdm(total=run.max_steps, initial=run.step, disable=run.rank != 0, dynamic_ncols=True, desc="pretrain")
    with StopRequest() as stop:
        run.save_rewind_point()
        while run.step < run.max_steps:
            record, stopping = run.train_step(stop.requested or run.step + 1 == args.stop_at_step)
            if run.step % cfg.eval_every == 0 or run.step == run.max_steps:
                record.update(run.evaluate())
            run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", theta=f"{record['pld_theta'] or 1:.3f}",
                            samples_s=f"{record['samples_per_sec']:.1f}")
            if stopping or run.step % cfg.checkpoint_every == 0 or run.step == run.max_steps:
                run.save_checkpoint()
            if stopping:
                run.tracker.finish()
                bar.write(f"stopped at step {run.step}; continue with --resume")
                shutdown_distributed()
                return 143 if stop.requested else 0
    bar.close()
    final = run.finish()
    if final is not None:
        print(f"done: {run.step} steps; model in {final}, metrics in {Path(args.output_dir) / 'metrics.jsonl'}")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
