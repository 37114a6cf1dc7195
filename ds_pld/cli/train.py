"""BERT pretraining with Progressive Layer Dropping (and EarlyBERT / LAMB when configured).

    deepspeed launch/train.py --deepspeed_config ds_configs/pld.json --output_dir runs/pld
    python launch/train.py --deepspeed_config ds_configs/cpu_small.json --output_dir runs/quick   # one rank
"""
from __future__ import annotations

import argparse
import os
import sys

from ds_pld.config import parse_override, with_overrides
from ds_pld.config_errors import ConfigError
from ds_pld.training.config import RunConfig, parse_run_config
from ds_pld.training.distributed import init_distributed, shutdown_distributed
from ds_pld.training.pretrain import pretrain

EXIT_CONFIG = 2  # a config or usage error: one line from rank 0, no traceback
# The short flags, each the same merge as `--set <key>=<value>` (applied after every --set, so the flag wins).
FLAG_KEYS = (("max_steps", "training.max_steps"), ("seed", "training.seed"), ("model", "model.preset"),
             ("data", "data.path"), ("init_from", "model.init_from"))
RANK_ENV = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True, help="ds_configs JSON (DeepSpeed + our blocks)")
    parser.add_argument("--output_dir", required=True, help="checkpoints, metrics.jsonl, curves.png, final/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config key, e.g. --set training.max_steps=100 --set model.num_layers=4; "
                             "the value is JSON when it parses, else a string; repeatable, later ones win")
    parser.add_argument("--max_steps", type=int, help="= --set training.max_steps=N")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint, if any")
    parser.add_argument("--stop_at_step", type=int, help="checkpoint and exit at this step (chunked jobs)")
    parser.add_argument("--seed", type=int, help="= --set training.seed=N")
    parser.add_argument("--model", help="= --set model.preset=NAME (bert-base, bert-tiny, ...): the rest of the "
                                        "model block (max_position_embeddings, kernels, ...) is kept")
    parser.add_argument("--data", help="= --set data.path=DIR: a folder written by launch/prepare_data.py")
    parser.add_argument("--init_from", metavar="PATH",
                        help="= --set model.init_from=PATH: start from these weights (a run's final/, a DeepSpeed "
                             "checkpoint folder of ours, or a Hugging Face RobertaPreLayerNormForMaskedLM / "
                             "BertForMaskedLM folder); optimizer, schedule, step and data position start fresh. "
                             "With --resume and a checkpoint in --output_dir, the run resumes its own checkpoint")
    parser.add_argument("--replan_schedule", action="store_true",
                        help="on --resume with another --max_steps, plan the LR schedule for the new max_steps "
                             "(default: keep the schedule the run started with)")
    parser.add_argument("--allow_world_size_change", action="store_true",
                        help="resume a checkpoint written by another number of ranks (the loss curve will differ)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> RunConfig:
    """The config file with `--set` and the short flags merged in, parsed once; errors name the key."""
    overrides = [parse_override(text) for text in args.set]
    overrides += [(key, getattr(args, flag)) for flag, key in FLAG_KEYS if getattr(args, flag) is not None]
    return parse_run_config(with_overrides(args.deepspeed_config, overrides))


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
    status = pretrain(config, args.output_dir, resume=args.resume, stop_at_step=args.stop_at_step,
                      replan_schedule=args.replan_schedule, allow_world_size_change=args.allow_world_size_change)
    shutdown_distributed()
    return status


if __name__ == "__main__":
    sys.exit(main())
