"""Export a pretrained model (model folder or DeepSpeed checkpoint) as a Hugging Face RobertaPreLayerNormForMaskedLM
folder, then check that transformers computes what we compute.

  python launch/export_hf.py --model runs/bert/final --output_dir runs/bert/hf
  python -c "from transformers import AutoModelForMaskedLM; AutoModelForMaskedLM.from_pretrained('runs/bert/hf')"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_pld.config_errors import ConfigError

# Pairs of different lengths: segment B and right padding are both exercised.
SAMPLE = (("The quick brown fox jumps over the lazy dog.", "It was not amused."), ("Short one.", "Two."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or DeepSpeed checkpoint folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder; default: the one saved with the model")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |ours - transformers'| on a padded sample batch")
    parser.add_argument("--no_check", action="store_true", help="skip loading the export back into transformers")
    return parser.parse_args(argv)


def check(model_path: str, output_dir: Path) -> float:
    """Load the export with transformers' Auto classes and compare on a right-padded pair / single batch."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ds_pld.export.hf import max_output_difference
    from ds_pld.models.io import load_pretrained

    ours = load_pretrained(model_path).eval()
    hf = AutoModelForMaskedLM.from_pretrained(str(output_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    batch = tokenizer([a for a, _ in SAMPLE], [b for _, b in SAMPLE], padding=True, truncation=True,
                      return_tensors="pt")
    return max_output_difference(ours, hf, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def within_tolerance(difference: float, tolerance: float) -> bool:
    """Written so that NaN fails: `nan > tolerance` is false, so the old check passed a NaN model."""
    return difference <= tolerance


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ds_pld.export.hf import export_hf

    try:
        out = export_hf(args.model, args.output_dir, tokenizer=args.tokenizer)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.no_check or not (out / "tokenizer_config.json").is_file():
        return 0
    difference = check(args.model, out)
    print(f"max |ours - transformers| on a padded sample batch: {difference:.2e}")
    if not within_tolerance(difference, args.tolerance):
        print(f"error: the export differs by more than {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
