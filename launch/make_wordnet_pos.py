"""Build the WordNet part-of-speech task (gloss of a headword's first sense -> n / v / adj / adv) as a custom task
folder for the GLUE harness, from the dictd WordNet database that launch/fetch_corpus.sh fetches.

  python launch/make_wordnet_pos.py --wn runs/corpus/root/usr/share/dictd/wn.dict.dz --out runs/downstream
  python launch/finetune.py --model runs/bert/final --tasks wordpos --glue_dir runs/downstream \\
      --output_dir runs/bert/wordpos
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.config_errors import ConfigError
from ds_pld.glue.wordnet_pos import PLACEHOLDER, POS_LABELS, TASK_NAME, bag_of_words_reference, build_wordnet_pos

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wn", default=str(ROOT / "runs" / "corpus" / "root" / "usr" / "share" / "dictd" /
                                            "wn.dict.dz"),
                        help="the dictd WordNet database (wn.dict.dz, with wn.index beside it)")
    parser.add_argument("--out", required=True, help="the glue_dir to write the task folder <out>/<name>/ into")
    parser.add_argument("--name", default=TASK_NAME, help="task (and folder) name")
    parser.add_argument("--train_per_class", type=int, default=1500,
                        help="train examples per label (capped by the smallest class)")
    parser.add_argument("--dev_per_class", type=int, default=400,
                        help="dev examples per label (capped by the smallest class)")
    parser.add_argument("--dev_fraction", type=float, default=None,
                        help="share of headwords hashed to dev; default: dev / (train + dev) per class")
    parser.add_argument("--seed", type=int, default=0, help="salt of the headword hash (split and selection)")
    parser.add_argument("--placeholder", default=PLACEHOLDER, help="what replaces the headword in its gloss")
    parser.add_argument("--max_entries", type=int, default=None,
                        help="read only the first N dictionary entries (a quick check); default: all")
    parser.add_argument("--no_reference", action="store_true",
                        help="skip the bag-of-words logistic-regression reference")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        built = build_wordnet_pos(args.wn, args.out, train_per_class=args.train_per_class,
                                  dev_per_class=args.dev_per_class, dev_fraction=args.dev_fraction, seed=args.seed,
                                  placeholder=args.placeholder, name=args.name, max_entries=args.max_entries)
        reference = None if args.no_reference else bag_of_words_reference(built["task_dir"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"task folder: {built['task_dir']} ({built['examples']} usable headwords in the database)")
    for split, counts in built["counts"].items():
        available = built["available"][split]
        print(f"{split:>6}: {sum(counts.values())} = " + ", ".join(f"{label} {counts[label]}" for label in POS_LABELS)
              + "   (candidates: " + ", ".join(f"{label} {available[label]}" for label in POS_LABELS) + ")")
    if reference is not None:
        print(f"dev accuracy: bag of words (TF-IDF + logistic regression) {reference['bag_of_words_accuracy']:.4f}, "
              f"majority class ('{reference['majority_label']}') {reference['majority_accuracy']:.4f}")
        print(json.dumps(reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
