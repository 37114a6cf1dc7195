"""BERT pretraining with PLD (and EarlyBERT / LAMB when configured): a thin wrapper of `ds_pld/cli/train.py`, which the
installed console command `ds-pld-train` runs too. This file is what `deepspeed`, `mpirun` and `srun` are given a
path to.

    deepspeed launch/train.py --deepspeed_config ds_configs/pld.json --output_dir runs/pld
    python launch/train.py --deepspeed_config ds_configs/cpu_small.json --output_dir runs/quick   # one rank
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when it is not installed

from ds_pld.cli.train import *  # noqa: E402,F403  (the script's names, for `python -c` users and tests)
from ds_pld.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
