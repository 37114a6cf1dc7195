"""Corpus -> tokenizer -> packed train/validation splits: a thin wrapper of `ds_pld/cli/prepare_data.py`, which the
installed console command `ds-pld-prepare` runs too. This file is what `deepspeed`, `mpirun` and `srun` are given a
path to.

    python launch/prepare_data.py --output_dir runs/data128
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when it is not installed

from ds_pld.cli.prepare_data import *  # noqa: E402,F403  (the script's names, for `python -c` users and tests)
from ds_pld.cli.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
