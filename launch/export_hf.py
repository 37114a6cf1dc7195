"""Export to Hugging Face (RobertaPreLayerNormForMaskedLM), checked against transformers: a thin wrapper of
`ds_pld/cli/export_hf.py`, which the installed console command `ds-pld-export` runs too. This file is what
`deepspeed`, `mpirun` and `srun` are given a path to.

    python launch/export_hf.py --model runs/bert/final --output_dir runs/bert/hf
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when it is not installed

from ds_pld.cli.export_hf import *  # noqa: E402,F403  (the script's names, for `python -c` users and tests)
from ds_pld.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
