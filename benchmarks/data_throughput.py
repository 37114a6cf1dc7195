"""Is the data pipeline ever the bottleneck? Tokens/s of preparation and of the loader vs. the training step.

    python benchmarks/data_throughput.py [--preset bert-base] [--train_micro_batch 8] [--num_proc N]

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
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.data import MLMMasker, StepBatches, load_pretraining_data, prepare_dataset
from ds_pld.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--loader_micro_batch", type=int, default=32)
    parser.add_argument("--loader_batches", type=int, default=300)
    parser.add_argument("--train_micro_batch", type=int, default=8)
    parser.add_argument("--train_steps", type=int, default=3)
    args = parser.parse_args()
    seq = args.max_seq_length

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        prepare_dataset(folder, max_seq_length=seq, num_proc=args.num_proc)
        prepare_s = time.perf_counter() - started
        data = load_pretraining_data(folder)
        prepared_tokens = sum(c["tokens"] for c in data.meta["counts"].values())

        batches = StepBatches(data.train, args.loader_micro_batch, seed=0)
        masker = MLMMasker(data.tokenizer)
        started = time.perf_counter()
        for i in range(args.loader_batches):
            step = i % (batches.steps_per_epoch * 2)
            masker(batches.examples(step, 0), batches.mask_seed(step, 0))
        loader_s = time.perf_counter() - started
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
        started = time.perf_counter()
        for step in range(1, args.train_steps + 1):
            train_step(step)
        train_s = time.perf_counter() - started
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
