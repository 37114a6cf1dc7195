"""Layer speed: training-step time with Progressive Layer Dropping (theta = 0.5), random-LTD (the middle layers on a
fraction of the tokens) and both, against the same model without them, measured in one run on the same batches,
interleaved so machine noise hits every mode alike; at one or more sequence lengths.

    python benchmarks/pld_speed.py --preset bert-base --tokens 512 --seq 128 512 --iters 12
    python benchmarks/pld_speed.py --preset bert-base --tokens 512 --seq 128 --ltd_fraction 0.25 0.5 0.75

Each mode's time ratio against the baseline is printed next to its ideal from the layers' matmul FLOPs
(benchmarks/flops.py): PLD runs the expected 8.75 of 12 layers at theta 0.5 whatever the sequence; random-LTD's
saving grows with the sequence, since attention (quadratic in the tokens) takes a larger share of a layer. The
batch is `--tokens` / seq sequences, so every sequence length does the same linear work. What the ideal leaves out
(embeddings, the MLM head, the optimizer step, gather/scatter) shows as the gap between the two.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import attention_share, layer_flops

from ds_pld.models import build_model
from ds_pld.models.config import BertConfig
from ds_pld.pld import drop_seed, keep_probabilities
from ds_pld.random_ltd import TokenDrop
from ds_pld.timing import StepTimer

THETA = 0.5


def ideal_ratio(config: BertConfig, seq: int, pld: bool, keep: int | None) -> float:
    """Expected layer FLOPs of a mode over the baseline's: PLD weighs layer l by its keep probability; random-LTD
    runs the middle layers on `keep` tokens."""
    def cost(tokens: int) -> float:
        return layer_flops(config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size, tokens)

    layers = config.num_layers
    weights = keep_probabilities(THETA, layers) if pld else [1.0] * layers
    kept = [keep if keep is not None and 0 < i < layers - 1 else seq for i in range(layers)]
    return sum(w * cost(n) for w, n in zip(weights, kept)) / (layers * cost(seq))


def make_step(model, optimizer, ids, labels, with_optimizer: bool) -> Callable[[dict], float]:
    def step(kwargs: dict) -> float:
        with StepTimer(ids.device) as timer:
            out = model(ids, labels=labels, **kwargs)
            out.loss.backward()
            if with_optimizer:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return timer.seconds

    return step


def measure(args: argparse.Namespace, model, optimizer, seq: int) -> list[tuple[str, float, float, float]]:
    """(mode, median step seconds, ratio to the baseline (mean of means), ideal ratio) for one sequence length."""
    device, config = next(model.parameters()).device, model.config
    batch = max(1, args.tokens // seq)
    ids = torch.randint(5, config.vocab_size, (batch, seq), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, -100)
    middle = tuple(range(1, config.num_layers - 1))

    def pld(i: int, **extra) -> dict:
        return {"progressive_layer_drop": True, "pld_theta": THETA, "pld_seed": drop_seed(0, i, 0), **extra}

    modes: dict[str, tuple[Callable[[int], dict], float]] = {
        "baseline": (lambda i: {}, 1.0),
        f"PLD theta={THETA}": (pld, ideal_ratio(config, seq, True, None)),
    }
    for fraction in args.ltd_fraction:
        drop = TokenDrop(max(1, round(fraction * seq)), middle)
        modes[f"random-LTD {drop.keep}/{seq}"] = (lambda i, drop=drop: {"random_ltd": drop},
                                                  ideal_ratio(config, seq, False, drop.keep))
        modes[f"PLD + random-LTD {drop.keep}/{seq}"] = (lambda i, drop=drop: pld(i, random_ltd=drop),
                                                        ideal_ratio(config, seq, True, drop.keep))
    step = make_step(model, optimizer, ids, labels, args.with_optimizer)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(args.warmup + args.iters):
        for name, (kwargs, _) in modes.items():
            elapsed = step(kwargs(i))
            if i >= args.warmup:
                times[name].append(elapsed)
    base = statistics.mean(times["baseline"])
    return [(name, statistics.median(times[name]), statistics.mean(times[name]) / base, ideal)
            for name, (_, ideal) in modes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="sequence lengths")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--ltd_fraction", type=float, nargs="+", default=[0.5],
                        help="shares of the tokens random-LTD keeps (a random-LTD and a PLD + random-LTD mode each)")
    parser.add_argument("--iters", type=int, default=12, help="timed steps per mode and sequence length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--with_optimizer", action="store_true",
                        help="include AdamW's step (a per-step constant that gradient accumulation amortises)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.preset, max_position_embeddings=max(512, *args.seq)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    config = model.config
    width = config.num_heads * config.head_dim
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"model {args.preset} (L={config.num_layers}), {args.tokens} tokens per step, {args.iters} timed steps per "
          f"mode, optimizer step {'included' if args.with_optimizer else 'excluded'}; random-LTD on layers 2-"
          f"{config.num_layers - 1} (1-based) keeping {', '.join(f'{f:.0%}' for f in args.ltd_fraction)} of the tokens")
    print("| seq | attention share of a layer | mode | median step (s) | time ratio | ideal (layer FLOPs) |")
    print("|---|---|---|---|---|---|")
    for seq in args.seq:
        share = attention_share(config.hidden_size, width, config.intermediate_size, seq)
        for name, median, ratio, ideal in measure(args, model, optimizer, seq):
            print(f"| {seq} | {share:.1%} | {name} | {median:.4f} | {ratio:.3f} | {ideal:.3f} |", flush=True)


if __name__ == "__main__":
    main()
