"""Prepare the pretraining dataset: corpus -> tokenizer -> packed train/validation splits in --output_dir.

  python launch/prepare_data.py --output_dir runs/data128                      # embedded default corpus
  python launch/prepare_data.py --corpus a.txt --corpus b.jsonl --output_dir runs/data128
  python launch/prepare_data.py --corpus a.txt --corpus b.jsonl --output_dir runs/data512 \\
      --max_seq_length 512 --tokenizer runs/data128/tokenizer                   # phase 2: same vocabulary
"""
from __future__ import annotations

import argparse
import logging
import sys

from ds_pld.config_errors import ConfigError
from ds_pld.data import load_pretraining_data, prepare_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", default=None, metavar="FILE",
                        help="text file (blank-line separated documents) or .jsonl/.json file, optionally .gz/.dz "
                             "compressed, or a glob pattern ('docs/**/*.txt', quoted); repeatable; "
                             "default: the embedded pydoc_data.topics corpus")
    parser.add_argument("--hub_dataset", default=None, help="hub dataset 'name[:config]' instead of --corpus (online)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub name; default: train a WordPiece vocabulary on the corpus")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--validation_fraction", type=float, default=0.05)
    parser.add_argument("--vocab_size", type=int, default=8192, help="upper bound for a trained vocabulary")
    parser.add_argument("--num_proc", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--text_field", default="text", help="JSON-lines / hub column holding the text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--encoding_errors", choices=("strict", "replace"), default="strict",
                        help="bytes that are not UTF-8: refuse the file (strict) or replace each with U+FFFD and "
                             "count them in meta.json (replace)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = prepare_dataset(args.output_dir, corpus_files=args.corpus, tokenizer=args.tokenizer,
                              max_seq_length=args.max_seq_length, validation_fraction=args.validation_fraction,
                              vocab_size=args.vocab_size, num_proc=args.num_proc, text_field=args.text_field,
                              hub_dataset=args.hub_dataset, seed=args.seed, encoding_errors=args.encoding_errors)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = load_pretraining_data(out)
    for name, counts in data.meta["counts"].items():
        print(f"{name:>10}: {counts['sequences']} sequences x {data.max_seq_length} = {counts['tokens']} tokens "
              f"from {counts['documents']} documents")
    replaced = data.meta["corpus"].get("replaced_bytes")
    if replaced:
        print(f"{'replaced':>10}: {replaced} bytes that were not UTF-8 (U+FFFD)")
    print(f"{'vocab':>10}: {data.vocab_size} ({data.meta['dtype']} ids)\n{'output':>10}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
