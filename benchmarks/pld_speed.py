"""Steady-state training-step time with Progressive Layer Dropping (theta = 0.5) against the same model without it,
measured in one run on the same batches, interleaved so machine noise hits both alike.

    python benchmarks/pld_speed.py --preset bert-base --batch 8 --seq 128 --iters 20

Prints the measured time ratio (PLD / baseline) next to the ideal one (expected kept layers / L = 8.75/12 = 0.729 for
L = 12) and the layers that actually ran, so the two can be told apart: a ratio above the ideal with as many layers
run means per-layer overhead; a different layers-run count is sampling noise.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_pld.models import build_model
from ds_pld.pld import drop_seed, expected_layers
from ds_pld.timing import StepTimer


def one_step(model, optimizer, ids, labels, pld: bool, seed: int, with_optimizer: bool) -> tuple[float, int]:
    with StepTimer(ids.device) as timer:
        out = model(ids, labels=labels, progressive_layer_drop=pld, pld_theta=0.5, pld_seed=seed)
        out.loss.backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timer.seconds, out.layers_run


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (x, y) points."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--with_optimizer", action="store_true",
                        help="include AdamW's step (a per-step constant that gradient accumulation amortises)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.preset).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    vocab, layers = model.config.vocab_size, model.config.num_layers
    ids = torch.randint(5, vocab, (args.batch, args.seq), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, -100)
    times: dict[bool, list[float]] = {False: [], True: []}
    ran: list[int] = []
    samples: list[tuple[int, float]] = []  # (layers run, seconds) of every timed step
    for i in range(args.warmup + args.iters):
        for pld in (False, True):
            elapsed, layers_run = one_step(model, optimizer, ids, labels, pld, drop_seed(0, i, 0), args.with_optimizer)
            if i >= args.warmup:
                times[pld].append(elapsed)
                samples.append((layers_run, elapsed))
                if pld:
                    ran.append(layers_run)
    base, pld_time = statistics.median(times[False]), statistics.median(times[True])
    mean_ratio = statistics.mean(times[True]) / statistics.mean(times[False])
    ideal = expected_layers(0.5, layers) / layers
    # Least squares t = fixed + per_layer * layers_run over all timed steps: the step time PLD would average at the
    # expected layer count, independent of how many layers this run's few draws happened to keep.
    fixed, per_layer = fit_line(samples)
    projected = (fixed + per_layer * expected_layers(0.5, layers)) / (fixed + per_layer * layers)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"model {args.preset} (L={layers}), batch {args.batch} x seq {args.seq}, {args.iters} timed steps per mode, "
          f"optimizer step {'included' if args.with_optimizer else 'excluded'}")
    print("| mode | median step (s) | samples/s | layers run (mean) |")
    print("|---|---|---|---|")
    print(f"| baseline | {base:.4f} | {args.batch / base:.2f} | {layers} |")
    print(f"| PLD theta=0.5 | {pld_time:.4f} | {args.batch / pld_time:.2f} | {statistics.mean(ran):.2f} |")
    print(f"time ratio PLD/baseline: {mean_ratio:.3f} (mean of means), ideal {ideal:.3f} "
          f"(expected layers {expected_layers(0.5, layers):.2f}/{layers}); "
          f"per-sample time saved: {1 - mean_ratio:.1%} (ideal {1 - ideal:.1%}); "
          f"layers-run ratio this sample: {statistics.mean(ran) / layers:.3f}")
    print(f"fit: step = {fixed:.4f} s + {per_layer:.4f} s x layers run -> ratio at the expected "
          f"{expected_layers(0.5, layers):.2f} layers: {projected:.3f} (per-sample time saved {1 - projected:.1%})")


if __name__ == "__main__":
    main()
