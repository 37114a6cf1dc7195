"""GLUE (and custom TSV task) fine-tuning with a summary table: a thin wrapper of `ds_pld/cli/finetune.py`, which the
installed console command `ds-pld-finetune` runs too. This file is what `deepspeed`, `mpirun` and `srun` are given a
path to.

    deepspeed launch/finetune.py --model runs/bert/final --tasks rte,mrpc --glue_dir data/glue --output_dir runs/glue
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when it is not installed

from ds_pld.cli.finetune import *  # noqa: E402,F403  (the script's names, for `python -c` users and tests)
from ds_pld.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
