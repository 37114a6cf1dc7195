r"""Fine-tune a pretrained model on GLUE and write a summary table (markdown + JSON with the GLUE average).

  deepspeed launch/finetune.py --model runs/bert/final --tasks rte,mrpc,stsb,cola,sst2,qnli,qqp,mnli \
      --glue_dir data/glue --seeds 1,2,3 --output_dir runs/glue --deepspeed_config ds_configs/glue.json
  python launch/finetune.py --model runs/bert/checkpoints --tasks rte --glue_dir data/glue \
      --output_dir runs/glue_rte --max_steps 100                                # one rank, plain python
  python launch/finetune.py --model runs/bert/final --tasks wordpos --glue_dir runs/downstream \
      --output_dir runs/wordpos            # a custom task folder runs/downstream/wordpos/ (launch/make_wordnet_pos.py)
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from ds_pld.config import parse_override, with_overrides
from ds_pld.config_errors import ConfigError
from ds_pld.training.distributed import init_distributed, shutdown_distributed

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "glue.json"  # = ds_configs/glue.json


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="pretrained model folder (save_pretrained / <run>/final) or DeepSpeed checkpoint folder")
    parser.add_argument("--tasks", required=True, help="comma-separated GLUE tasks (cola,sst2,mrpc,stsb,qqp,mnli,"
                                                       "qnli,rte,wnli) or 'all'; any other name is a custom task "
                                                       "folder <glue_dir>/<name>/ with task.json, train.tsv, dev.tsv")
    parser.add_argument("--glue_dir", default=None,
                        help="folder in the GLUE TSV layout (<dir>/RTE/train.tsv, dev.tsv), also holding custom task "
                             "folders (<dir>/<name>/task.json); default: the Hugging Face 'glue' dataset (needs the "
                             "network; GLUE tasks only)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--deepspeed_config", default=str(DEFAULT_CONFIG),
                        help="DeepSpeed config with a 'glue' block")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config key, e.g. --set glue.learning_rate=3e-5 --set glue.tasks.rte.epochs=5"
                             "; the value is JSON when it parses, else a string; repeatable, later ones win")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder; default: the one saved with the model")
    parser.add_argument("--seeds", type=_int_list, default=None, help="e.g. 1,2,3; default: 'glue.seeds'")
    parser.add_argument("--epochs", type=float, default=None, help="epochs for every task (overrides the config)")
    parser.add_argument("--max_steps", type=int, default=None, help="cap on optimizer steps per run (smoke tests)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ds_pld.glue.job import run_glue

    try:
        config = with_overrides(args.deepspeed_config, [parse_override(text) for text in args.set])
        init_distributed()
        summary = run_glue(args.model, args.tasks, args.output_dir, config, glue_dir=args.glue_dir,
                           tokenizer=args.tokenizer, seeds=args.seeds, epochs=args.epochs, max_steps=args.max_steps)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shutdown_distributed()
    average = summary["glue_average"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"GLUE average: {average:.2f}" if not math.isnan(average) else "GLUE average: n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
