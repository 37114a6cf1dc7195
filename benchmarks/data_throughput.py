"""Is the data pipeline ever the bottleneck? Tokens/s of preparation and of the loader vs. the training step; and
how preparation's time and memory grow with the corpus.

    python benchmarks/data_throughput.py [--preset bert-base] [--train_micro_batch 8] [--num_proc N]
    python benchmarks/data_throughput.py --scaling 1 4 16 [--corpus 'FILES...'] [--num_proc N]

Scaling: the corpus (default: the embedded one) repeated 1x, 4x, 16x into one text file, each prepared from scratch
in a fresh process; prints tokens/s of the preparation (interpreter start-up and imports excluded), the process
tree's peak RSS (the tokenizing workers included, from wait4) and
the seconds per stage from meta.json. Bounded memory shows as a flat peak-RSS column.

Preparation: prepare_dataset on the embedded default corpus into a fresh folder (uncached: vocab training,
tokenizing, packing, saving). Loader: StepBatches.examples + MLMMasker per micro-batch. Training: forward +
backward + AdamW step of build_model(preset) at the same sequence length. Prints the ratio loader / training,
which must be >> 1 for the loader to be negligible.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.data import MLMMasker, StepBatches, load_pretraining_data, prepare_dataset
from ds_pld.models import build_model
from ds_pld.timing import StepTimer

PREPARE_CHILD = """
import sys
from ds_pld.data import prepare_dataset
prepare_dataset(sys.argv[1], corpus_files=[sys.argv[2]], max_seq_length=int(sys.argv[3]), num_proc=int(sys.argv[4]),
                encoding_errors="replace")
"""


def corpus_text(patterns: list[str] | None) -> bytes:
    """The corpus as one blank-line separated text (decompressed; dictd entries are documents already)."""
    from ds_pld.data.corpus import (
        default_documents,
        expand_corpus_paths,
        file_kind,
        iter_dictd_documents,
        open_corpus_bytes,
    )

    if not patterns:
        return "\n\n".join(default_documents()).encode()
    parts = []
    for path in expand_corpus_paths(patterns):
        if file_kind(path) == "dictd":
            parts.append("\n\n".join(iter_dictd_documents(path, "replace")).encode())
        else:
            with open_corpus_bytes(path) as handle:
                parts.append(handle.read())
    return b"\n\n".join(parts)


def scaling(args: argparse.Namespace) -> list[dict]:
    """Prepare the corpus repeated x times, each in a fresh process tree; wall time, tokens/s and peak RSS."""
    base = corpus_text(args.corpus)
    num_proc = args.num_proc or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for scale in args.scaling:
            corpus = Path(folder) / f"corpus_{scale}x.txt"
            with corpus.open("wb") as handle:
                for _ in range(scale):
                    handle.write(base + b"\n\n")
            out = Path(folder) / f"out_{scale}x"
            log = Path(folder) / f"prepare_{scale}x.log"  # a file, not a pipe: progress bars would fill a pipe
            with StepTimer() as timer, log.open("wb") as sink:  # a child process: no device of ours to wait for
                proc = subprocess.Popen([sys.executable, "-c", PREPARE_CHILD, str(out), str(corpus),
                                         str(args.max_seq_length), str(num_proc)],
                                        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                                        stdout=sink, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(proc.pid, 0)
            seconds = timer.seconds
            if status:
                raise RuntimeError(f"preparing {scale}x failed: {log.read_text(errors='replace')[-2000:]}")
            meta = json.loads((out / "meta.json").read_text())
            tokens = sum(c["corpus_tokens"] for c in meta["counts"].values())
            rows.append({"scale": scale, "corpus_mb": round(corpus.stat().st_size / 2**20, 1), "tokens": tokens,
                         "process_seconds": round(seconds, 1), "seconds": meta["seconds"],
                         "tokens_per_s": round(tokens / meta["seconds"]),
                         "peak_rss_mb": round(usage.ru_maxrss / 1024), "stage_seconds": meta["stage_seconds"],
                         "shards": len(list((out / "dataset" / "train").glob("*.arrow")))})
            corpus.unlink()
            shutil.rmtree(out)
    return rows


def print_scaling(rows: list[dict], args: argparse.Namespace) -> None:
    print(json.dumps({"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                      "load_average_1min": round(os.getloadavg()[0], 2), "num_proc": args.num_proc,
                      "corpus": args.corpus or "embedded default", "rows": rows}, indent=2))
    print("| corpus | tokens | preparation s | tokens/s | peak RSS MB | slowest stages (s) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        stages = sorted(row["stage_seconds"].items(), key=lambda item: -item[1])[:3]
        print(f"| {row['scale']}x ({row['corpus_mb']} MB) | {row['tokens']:,} | {row['seconds']} | "
              f"{row['tokens_per_s']:,} | {row['peak_rss_mb']} | "
              + ", ".join(f"{name} {value:.1f}" for name, value in stages) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--loader_micro_batch", type=int, default=32)
    parser.add_argument("--loader_batches", type=int, default=300)
    parser.add_argument("--train_micro_batch", type=int, default=8)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--scaling", type=int, nargs="+", metavar="X",
                        help="scaling table instead: prepare the corpus repeated X times (e.g. 1 4 16)")
    parser.add_argument("--corpus", action="append", help="corpus files / globs for --scaling (default: embedded)")
    args = parser.parse_args()
    if args.scaling:
        print_scaling(scaling(args), args)
        return
    seq = args.max_seq_length

    with tempfile.TemporaryDirectory() as folder:
        with StepTimer() as timer:  # host work only, as is the loader's below
            prepare_dataset(folder, max_seq_length=seq, num_proc=args.num_proc)
        prepare_s = timer.seconds
        data = load_pretraining_data(folder)
        prepared_tokens = sum(c["tokens"] for c in data.meta["counts"].values())

        batches = StepBatches(data.train, args.loader_micro_batch, seed=0)
        masker = MLMMasker(data.tokenizer)
        with StepTimer() as timer:
            for i in range(args.loader_batches):
                step = i % (batches.steps_per_epoch * 2)
                masker(batches.examples(step, 0), batches.mask_seed(step, 0))
        loader_s = timer.seconds
        loader_tokens = args.loader_batches * args.loader_micro_batch * seq

        torch.manual_seed(0)
        model = build_model(args.preset, vocab_size=data.vocab_size).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_batches = StepBatches(data.train, args.train_micro_batch, seed=0)

        def train_step(step: int) -> None:
            batch = masker(train_batches.examples(step, 0), train_batches.mask_seed(step, 0))
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_step(0)  # warm-up: allocator, AdamW state
        with StepTimer(next(model.parameters()).device) as timer:
            for step in range(1, args.train_steps + 1):
                train_step(step)
        train_s = timer.seconds
        train_tokens = args.train_steps * args.train_micro_batch * seq

    figures = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "prepare_tokens_per_s": round(prepared_tokens / prepare_s),
        "prepare_seconds": round(prepare_s, 2), "prepared_tokens": prepared_tokens,
        "loader_tokens_per_s": round(loader_tokens / loader_s),
        "train_tokens_per_s": round(train_tokens / train_s, 1),
        "train_step_seconds": round(train_s / args.train_steps, 2),
        "loader_over_train": round(loader_tokens / loader_s / (train_tokens / train_s)),
        "settings": vars(args),
    }
    print(json.dumps(figures, indent=2))
    print(f"loader {figures['loader_tokens_per_s']:,} tokens/s vs {args.preset} training "
          f"{figures['train_tokens_per_s']:,} tokens/s: ratio {figures['loader_over_train']:,}x")


if __name__ == "__main__":
    main()
