"""Training-step speed of an EarlyBERT-pruned model against the full model, alone and combined with PLD.

Part 1: step time (forward + backward + AdamW step, train mode, dropout on) of `--layers` layers of the preset, full
against the drawn ticket (the paper's setting by default: a third of the heads pruned in every layer, 40% of the FFN
neurons), with the FLOP ratio of the layer matmuls (QKV, scores, context, output projection, FFN) printed beside the
measured ratio. The pruned model is built by the real path: slimming coefficients -> EarlyBird.ticket -> prune_model.

Part 2: time per sample of the pruned model trained with PLD (theta `--theta`, the steady state of the schedule) on
`--pld-layers` layers against the full model without PLD, with the ideal printed: FLOP ratio x expected layers / L
(8.75 / 12 at theta 0.5), and the same with the layers the sampled steps actually ran.

A small vocabulary (`--vocab`, default 1024) keeps the MLM head and the embedding's AdamW update from hiding the
layers; the masked positions are 15% of the tokens. Variants are timed round-robin (one step of each in turn) so load
drift on a shared machine hits them alike. Part 1 prints the minimum (the least disturbed step) and the median. Part 2
times each PLD draw `--rounds` times, keeps each draw's minimum and averages over the draws (PLD's cost is an
expectation over draws).

    python benchmarks/earlybert_speed.py --layers 2 --batch 8 --seq 128             # CPU-sized
    python benchmarks/earlybert_speed.py --layers 2 --tokens 1024 --seq 128 512     # the sequence-length axis
    python benchmarks/earlybert_speed.py --layers 12 --batch 32 --device cuda       # GPU

With several `--seq` values each part runs at each length (batch `--tokens` / seq when `--tokens` is given, so
every length does the same linear work) and a closing table puts the measured ratios next to the FLOP ratios and
attention's share of a layer: pruning heads removes attention work, pruning FFN neurons does not, so the ticket's
FLOP ratio moves with the sequence length.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script from a checkout: make the repository's ds_pld importable without installing it.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ds_pld.earlybert import EarlyBertConfig, EarlyBird, prune_model, slimming_layers
from ds_pld.models import BertConfig, BertForPreTraining, build_bert_config
from ds_pld.models.bert import IGNORE_INDEX
from ds_pld.pld import expected_layers, sample_keep_mask
from ds_pld.timing import StepTimer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import attention_share, layer_flops  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--layers", type=int, default=2, help="layers in part 1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, nargs="+", default=[128], help="one or more sequence lengths")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per step: batch = tokens / seq at each length (default: --batch sequences)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--head-ratio", type=float, default=1.0 / 3.0)
    parser.add_argument("--ffn-ratio", type=float, default=0.4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant in part 1")
    parser.add_argument("--pld-layers", type=int, default=None, help="layers in part 2 (default: the preset's)")
    parser.add_argument("--pld-batch", type=int, default=None, help="batch in part 2 (default: --batch)")
    parser.add_argument("--pld-steps", type=int, default=16, help="PLD draws (seeds) timed in part 2")
    parser.add_argument("--rounds", type=int, default=2, help="times each PLD draw is timed in part 2")
    parser.add_argument("--theta", type=float, default=0.5)
    parser.add_argument("--skip-pld", action="store_true", help="part 1 only")
    parser.add_argument("--skip-part1", action="store_true", help="part 2 only")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (with --threads 1 it is the work done, "
                             "whatever else loads a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Models:
    full: BertForPreTraining
    slim: BertForPreTraining


def layer_matmul_flops(config: BertConfig, seq: int) -> float:
    """Forward matmul FLOPs of all layers on one sequence (training costs 3x for both models, so ratios hold)."""
    return sum(layer_flops(config.hidden_size, config.heads(layer) * config.head_dim, config.intermediate(layer), seq)
               for layer in range(config.num_layers))


def build_models(args: argparse.Namespace, layers: int) -> Models:
    """The full model (no coefficients) and the ticket drawn from random coefficients, pruned for real."""
    config = build_bert_config(args.preset, num_layers=layers, vocab_size=args.vocab, kernels="auto",
                               max_position_embeddings=max(512, args.seq))
    torch.manual_seed(0)
    full = BertForPreTraining(config)
    searched = BertForPreTraining(config.with_updates(slimming=True))
    searched.load_state_dict(full.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in slimming_layers(searched):
            layer.head_coef.copy_(torch.rand(layer.head_coef.shape, generator=gen))
            layer.ffn_coef.copy_(torch.rand(layer.ffn_coef.shape, generator=gen))
    eb = EarlyBertConfig(head_prune_ratio=args.head_ratio, ffn_prune_ratio=args.ffn_ratio, ffn_mode="layerwise")
    slim = prune_model(searched, EarlyBird(eb).ticket(searched))
    device = torch.device(args.device)
    return Models(full.to(device).train(), slim.to(device).train())


def make_step(model: BertForPreTraining, args: argparse.Namespace, batch: int, pld: bool) -> Callable[[int], int]:
    """One optimizer step on fixed random tokens; returns the layers that ran."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, args.vocab, (batch, args.seq), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, IGNORE_INDEX)
    ids, labels = ids.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(seed: int) -> int:
        kwargs = {"progressive_layer_drop": True, "pld_theta": args.theta, "pld_seed": seed} if pld else {}
        out = model(ids, labels=labels, **kwargs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.layers_run

    return step


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures CPU work; use it with --device cpu")
    return time.process_time if args.clock == "cpu" else time.perf_counter


def round_robin(steps: dict[str, Callable[[int], int]], warmup: int, seeds: int, rounds: int, device: str,
                clock: Callable[[], float] = time.perf_counter
                ) -> tuple[dict[str, list[list[float]]], dict[str, list[int]]]:
    """Time one step of each variant in turn, `rounds` times over the seeds 0..seeds-1 (the PLD draws): returns
    times[variant][seed] (one entry per round) and the layers each seed ran."""
    times: dict[str, list[list[float]]] = {name: [[] for _ in range(seeds)] for name in steps}
    layers: dict[str, list[int]] = {name: [0] * seeds for name in steps}
    for i in range(warmup):
        for step in steps.values():
            step(10_000 + i)
    for _ in range(rounds):
        for seed in range(seeds):
            for name, step in steps.items():
                with StepTimer(device, clock) as timer:
                    layers[name][seed] = step(seed)
                times[name][seed].append(timer.seconds)
    return times, layers


def flop_ratio(models: Models, seq: int) -> float:
    return layer_matmul_flops(models.slim.config, seq) / layer_matmul_flops(models.full.config, seq)


def part1(args: argparse.Namespace) -> tuple[float, float]:
    """Returns (measured median ratio, FLOP ratio)."""
    models = build_models(args, args.layers)
    ratio = flop_ratio(models, args.seq)
    steps = {"full": make_step(models.full, args, args.batch, pld=False),
             "earlybert": make_step(models.slim, args, args.batch, pld=False)}
    times, _ = round_robin(steps, args.warmup, 1, args.steps, args.device, clock_of(args))
    full, slim = times["full"][0], times["earlybert"][0]
    cfg = models.slim.config
    print(f"part 1: {args.preset} x {args.layers} layers, batch {args.batch}, seq {args.seq}, vocab {args.vocab}, "
          f"{args.steps} timed steps each")
    print(f"  ticket: heads per layer {list(cfg.layer_heads)} of {cfg.num_heads}, FFN neurons per layer "
          f"{list(cfg.layer_intermediate)} of {cfg.intermediate_size}")
    for label, pick in (("min", min), ("median", statistics.median)):
        full_s, slim_s = pick(full), pick(slim)
        print(f"  {label:6s}  full {full_s * 1e3:8.1f} ms/step   EarlyBERT {slim_s * 1e3:8.1f} ms/step   "
              f"ratio {slim_s / full_s:.3f}   speed-up {full_s / slim_s:.2f}x")
    print(f"  layer-matmul FLOP ratio {ratio:.3f}")
    return statistics.median(slim) / statistics.median(full), ratio


def part2(args: argparse.Namespace) -> tuple[float, float]:
    """Returns (measured ratio per sample, ideal ratio)."""
    num_layers = args.pld_layers or build_bert_config(args.preset).num_layers
    batch = args.pld_batch or args.batch
    models = build_models(args, num_layers)
    ratio = flop_ratio(models, args.seq)
    steps = {"full": make_step(models.full, args, batch, pld=False),
             "earlybert+pld": make_step(models.slim, args, batch, pld=True)}
    times, layers = round_robin(steps, args.warmup, args.pld_steps, args.rounds, args.device, clock_of(args))
    # Per draw the fastest of the rounds (the least disturbed by other load), then the mean over draws.
    base = statistics.mean(min(t) for t in times["full"]) / batch
    combined = statistics.mean(min(t) for t in times["earlybert+pld"]) / batch
    expected = expected_layers(args.theta, num_layers)
    ran = statistics.mean(layers["earlybert+pld"])
    sampled = [sum(sample_keep_mask(args.theta, num_layers, seed)) for seed in range(args.pld_steps)]
    assert layers["earlybert+pld"] == sampled, "the model ran other layers than drawn"
    print(f"part 2: {args.preset} x {num_layers} layers, batch {batch}, seq {args.seq}, PLD theta {args.theta} "
          f"(expected layers {expected:.2f}), {args.pld_steps} PLD draws x {args.rounds} rounds")
    print(f"  full model, no PLD        {base * 1e3:9.2f} ms/sample")
    print(f"  EarlyBERT slim + PLD      {combined * 1e3:9.2f} ms/sample   (layers run: mean {ran:.2f})")
    print(f"  measured ratio {combined / base:.3f}  (speed-up {base / combined:.2f}x);  ideal: FLOP ratio {ratio:.3f}"
          f" x {expected:.2f}/{num_layers} = {ratio * expected / num_layers:.3f}, with the layers run "
          f"{ratio * ran / num_layers:.3f}")
    return combined / base, ratio * expected / num_layers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"load average {load_average()}")
    rows = []
    for seq in args.seq:
        batch = max(1, args.tokens // seq) if args.tokens else args.batch
        at = argparse.Namespace(**{**vars(args), "seq": seq, "batch": batch,
                                   "pld_batch": batch if args.tokens else args.pld_batch})
        pruned = part1(at) if not args.skip_part1 else None
        combined = part2(at) if not args.skip_pld else None
        rows.append((seq, batch, pruned, combined))
    if len(rows) > 1:
        config = build_bert_config(args.preset)
        print("| seq | batch | attention share of a layer | EarlyBERT / full (FLOP ratio) | "
              "EarlyBERT + PLD / full (ideal) |")
        print("|---|---|---|---|---|")
        for seq, batch, pruned, combined in rows:
            share = attention_share(config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size,
                                    seq)
            cells = [f"{m:.3f} ({i:.3f})" if (m, i) != (None, None) else "-" for m, i in (pruned or (None, None),
                                                                                          combined or (None, None))]
            print(f"| {seq} | {batch} | {share:.1%} | {cells[0]} | {cells[1]} |")
    print(f"load average at the end {load_average()}")


def load_average() -> str:
    """The machine's 1/5/15-minute load: timings on a shared machine mean little without it."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
