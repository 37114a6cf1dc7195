"""Time to quality: do PLD and EarlyBERT reach the baseline's validation loss in less wall time?

    python benchmarks/time_to_quality.py --data runs/data_dict --out runs/ttq            # the study, 2 CPU cores
    python benchmarks/time_to_quality.py --smoke --out /tmp/ttq                           # CI: a few steps per arm
    python benchmarks/time_to_quality.py --device cuda --data DIR --out DIR --layers 12 --hidden 768 --batch 256

Four arms train the same model (same initial weights), on the same data order and MLM masks, with the same
learning-rate recipe: baseline, pld, earlybert, pld+earlybert. Each is a real `PretrainingRun` stepped by the
functions `launch/train.py`'s loop calls, on one rank, so what is measured is the trainer users run, EarlyBERT's draw
and engine rebuild included. The arms run interleaved, `--chunk` steps at a time, in one process: a change in the
machine's load during the study hits every arm alike, and the ratios stay honest on a shared machine.

Each arm's clock counts only its training steps. Whenever it passes a multiple of `--eval_every_s`, and at the
end, the arm is evaluated (MLM loss and accuracy on a fixed held-out slice with fixed masks, off the clock).
Outputs in `--out`: `time_to_quality.json`, `time_to_quality.png` (validation loss against training wall time,
all arms) and one folder per arm (metrics.jsonl). The printed table gives the final validation loss, the wall time
and the time each arm needs to reach the baseline's final validation loss (and to come within 2% of it), as ratios
to the baseline's time, interpolated linearly between evaluations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("baseline", "pld", "earlybert", "pld+earlybert")
GOALS = {  # arm: (target: "final" = baseline's final val loss or "within2" = 2% above it, max time ratio)
    "pld": ("final", 0.8), "earlybert": ("within2", 0.7), "pld+earlybert": ("final", 0.65)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data", help="a folder from launch/prepare_data.py (default: prepare --corpus or the "
                                       "embedded corpus into <out>/data)")
    parser.add_argument("--corpus", action="append", help="corpus files / glob patterns to prepare when no --data")
    parser.add_argument("--encoding_errors", default="strict", choices=("strict", "replace"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: all cores)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    # Model and run size.
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="hidden and attention dropout; 0 in the single-epoch regime (as in Cramming)")
    parser.add_argument("--batch", type=int, default=128, help="sequences per optimizer step")
    parser.add_argument("--micro_batch", type=int, default=None, help="default: --batch (no accumulation)")
    parser.add_argument("--steps", type=int, default=300, help="the baseline's optimizer steps")
    parser.add_argument("--steps_factor", action="append", default=[], metavar="ARM=F",
                        help="run ARM for F x --steps (its lr schedule stretched alike); default 1 for every arm")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr (pre-LN allows a high one)")
    parser.add_argument("--warmup", type=float, default=0.06, help="warmup proportion, then linear decay to 0")
    parser.add_argument("--seed", type=int, default=42)
    # PLD and EarlyBERT.
    parser.add_argument("--theta", type=float, default=0.5, help="PLD theta_bar")
    parser.add_argument("--gamma_steps", type=float, default=100.0,
                        help="gamma = gamma_steps / steps: the paper's gamma 0.001 over 100K steps is 100, so theta "
                             "is within 1%% of theta_bar after the same 5%% of any run's length")
    parser.add_argument("--head_prune", type=float, default=1 / 3)
    parser.add_argument("--ffn_prune", type=float, default=0.4)
    parser.add_argument("--search_fraction", type=float, default=0.1,
                        help="EarlyBERT's longest search as a fraction of the run (max_search_steps)")
    parser.add_argument("--earlybert_lambda", type=float, default=1e-4)
    parser.add_argument("--rewind", action="store_true", help="EarlyBERT: rewind to the initial weights at the draw")
    # Measurement.
    parser.add_argument("--eval_every_s", type=float, default=30.0, help="evaluation marks, seconds of training")
    parser.add_argument("--eval_batches", type=int, default=16, help="validation micro-batches per evaluation")
    parser.add_argument("--chunk", type=int, default=5, help="steps an arm runs before the next arm's turn")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: tiny model, a few steps per arm on the embedded corpus; checks outputs, no timing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.batch, args.steps = 2, 64, 2, 8, 6
        args.eval_every_s, args.eval_batches, args.chunk = 0.0, 2, 2
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown or "baseline" not in args.arms:
        parser.error(f"--arms must include 'baseline' and name only {ARMS}; got {args.arms}")
    factors = {}
    for item in args.steps_factor:
        arm, _, value = item.partition("=")
        if arm not in ARMS or not value:
            parser.error(f"--steps_factor {item!r}: expected ARM=F with ARM in {ARMS}")
        factors[arm] = float(value)
    args.steps_factor = factors
    return args


def arm_config(arm: str, args: argparse.Namespace, data: Path, seq: int) -> dict[str, Any]:
    """The ds_configs-style dict of one arm: everything but the arm's speed-up is the same for all arms."""
    steps = max(1, round(args.steps * args.steps_factor.get(arm, 1.0)))
    config: dict[str, Any] = {
        "train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.micro_batch or args.batch,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                  "weight_decay": 0.01}},
        "lr_schedule": {"type": "warmup_linear", "warmup_proportion": args.warmup},
        "model": {"preset": "bert-base", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_heads": args.heads, "intermediate_size": 4 * args.hidden, "max_position_embeddings": seq,
                  "hidden_dropout": args.dropout, "attention_dropout": args.dropout},
        "data": {"path": str(data)},
        "training": {"max_steps": steps, "checkpoint_every": 10**9, "eval_every": 10**9,
                     "eval_batches": args.eval_batches, "seed": args.seed},
        "wandb": {"enabled": False},
    }
    if args.bf16:
        config["bf16"] = {"enabled": True}
    if "pld" in arm.split("+"):
        config["progressive_layer_drop"] = {"enabled": True, "theta": args.theta,
                                            "gamma": args.gamma_steps / steps}
    if "earlybert" in arm.split("+"):
        search = max(2, round(args.search_fraction * steps))
        check_every = max(1, search // 10)
        config["earlybert"] = {
            "lambda_head": args.earlybert_lambda, "lambda_ffn": args.earlybert_lambda,
            "head_prune_ratio": args.head_prune, "ffn_prune_ratio": args.ffn_prune,
            "head_mode": "layerwise", "ffn_mode": "global", "check_every": check_every, "window": 3,
            "epsilon": 0.1, "max_search_steps": search, "rewind": args.rewind}
    return config


@dataclass
class Arm:
    """One arm's run and its measurements; `clock` counts training steps only (evaluation is off the clock)."""

    name: str
    run: Any
    clock: float = 0.0
    next_mark: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    layers_run: list[float] = field(default_factory=list)
    drawn_step: int | None = None

    @property
    def done(self) -> bool:
        return self.run.step >= self.run.max_steps

    def evaluate(self) -> dict[str, float]:
        from ds_pld.training.evaluate import evaluate

        point = {"time_s": self.clock, "step": self.run.step, **evaluate(self.run)}
        self.curve.append(point)
        return point

    def train(self, steps: int, eval_every_s: float) -> None:
        from ds_pld.training.outputs import log
        from ds_pld.training.step import train_step

        for _ in range(steps):
            if self.done:
                return
            started = time.perf_counter()
            record, _ = train_step(self.run)
            elapsed = time.perf_counter() - started
            self.clock += elapsed
            self.step_times.append(elapsed)
            self.layers_run.append(record["layers_run"])
            self.drawn_step = record.get("earlybert_drawn_step", self.drawn_step)
            if self.done or self.clock >= self.next_mark:
                record.update(self.evaluate())
                self.next_mark = (math.floor(self.clock / eval_every_s) + 1) * eval_every_s if eval_every_s > 0 \
                    else self.clock
            log(self.run, record)


def time_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """First training time at which the validation loss is <= target, linear between evaluations; None if never."""
    for before, after in zip(curve, curve[1:]):
        if after["val_loss"] <= target:
            if before["val_loss"] <= target:
                return before["time_s"]
            share = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
            return before["time_s"] + share * (after["time_s"] - before["time_s"])
    return curve[0]["time_s"] if curve and curve[0]["val_loss"] <= target else None


def summarize(arms: list[Arm]) -> dict[str, Any]:
    baseline = next(arm for arm in arms if arm.name == "baseline")
    target = baseline.curve[-1]["val_loss"]
    base_time = baseline.clock
    rows = {}
    for arm in arms:
        reach = time_to_reach(arm.curve, target)
        within = time_to_reach(arm.curve, target * 1.02)
        rows[arm.name] = {
            "steps": arm.run.step, "final_val_loss": arm.curve[-1]["val_loss"],
            "final_val_accuracy": arm.curve[-1]["val_accuracy"], "train_time_s": arm.clock,
            "time_ratio": arm.clock / base_time,
            "median_step_s": statistics.median(arm.step_times),
            "median_step_ratio": statistics.median(arm.step_times) / statistics.median(baseline.step_times),
            "mean_layers_run": statistics.fmean(arm.layers_run),
            "time_to_baseline_final_s": reach,
            "time_to_baseline_final_ratio": None if reach is None else reach / base_time,
            "time_to_within_2pct_s": within,
            "time_to_within_2pct_ratio": None if within is None else within / base_time,
            "earlybert_drawn_step": arm.drawn_step,
            "curve": arm.curve,
        }
    goals = {}
    for name, (kind, limit) in GOALS.items():
        if name in rows:
            ratio = rows[name]["time_to_baseline_final_ratio" if kind == "final" else "time_to_within_2pct_ratio"]
            goals[name] = {"target": "baseline final val loss" if kind == "final" else "within 2% of it",
                           "max_ratio": limit, "ratio": ratio, "met": ratio is not None and ratio <= limit}
    return {"baseline_final_val_loss": target, "baseline_train_time_s": base_time, "arms": rows, "goals": goals}


def format_table(summary: dict[str, Any]) -> str:
    def ratio(value: float | None) -> str:
        return "never" if value is None else f"{value:.3f}"

    lines = ["| arm | steps | final val loss | val acc | wall s (ratio) | median step ratio | layers run | "
             "to baseline final (ratio) | to within 2% (ratio) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in summary["arms"].items():
        lines.append(f"| {name} | {row['steps']} | {row['final_val_loss']:.4f} | {row['final_val_accuracy']:.4f} | "
                     f"{row['train_time_s']:.1f} ({row['time_ratio']:.3f}) | {row['median_step_ratio']:.3f} | "
                     f"{row['mean_layers_run']:.2f} | {ratio(row['time_to_baseline_final_ratio'])} | "
                     f"{ratio(row['time_to_within_2pct_ratio'])} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in summary["arms"].items():
        curve = row["curve"]
        ax.plot([p["time_s"] for p in curve], [p["val_loss"] for p in curve], marker=".", label=name)
    ax.axhline(summary["baseline_final_val_loss"], color="grey", linestyle="--", linewidth=1,
               label="baseline final")
    finals = [row["final_val_loss"] for row in summary["arms"].values()]
    ax.set_ylim(min(finals) - 0.3, max(finals) + 2.0)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("validation MLM loss")
    ax.set_title("time to quality")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    from ds_pld.data import prepare_dataset

    if args.data:
        return Path(args.data)
    kwargs = {"vocab_size": 2048, "max_seq_length": 64} if args.smoke else {"max_seq_length": 128}
    return prepare_dataset(out / "data", corpus_files=args.corpus, encoding_errors=args.encoding_errors,
                           num_proc=1 if args.smoke else None, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ["WANDB_MODE"] = "disabled"
    import torch

    from ds_pld.data import load_pretraining_data
    from ds_pld.training.config import parse_run_config
    from ds_pld.training.distributed import init_distributed, shutdown_distributed
    from ds_pld.training.outputs import finish
    from ds_pld.training.run import build_run

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    seq = load_pretraining_data(data).max_seq_length
    init_distributed()
    load_start = os.getloadavg()[0]
    arms = []
    for name in args.arms:
        config = parse_run_config(arm_config(name, args, data, seq))
        arms.append(Arm(name, build_run(config, out / name.replace("+", "_"), resume=False)))
        arms[-1].evaluate()  # the common starting point, at time 0
        arms[-1].next_mark = args.eval_every_s
    started = time.perf_counter()
    while not all(arm.done for arm in arms):
        for arm in arms:
            arm.train(args.chunk, args.eval_every_s)
    wall = time.perf_counter() - started
    summary = summarize(arms)
    summary.update(
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        date=time.strftime("%Y-%m-%d"), settings={k: v for k, v in vars(args).items()},
        data={"path": str(data), "train_tokens": load_pretraining_data(data).meta["counts"]["train"]["tokens"]},
        machine={"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "device": args.device,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        load_average_1min={"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        study_wall_s=wall)
    for arm in arms:
        finish(arm.run)
    (out / "time_to_quality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(summary, out / "time_to_quality.png")
    print(format_table(summary))
    for name, goal in summary["goals"].items():
        shown = "never" if goal["ratio"] is None else f"{goal['ratio']:.3f}"
        print(f"goal {name}: reach {goal['target']} in <= {goal['max_ratio']}x baseline time: {shown} -> "
              f"{'met' if goal['met'] else 'missed'}")
    print(f"wrote {out / 'time_to_quality.json'} and {out / 'time_to_quality.png'} "
          f"(study {wall / 60:.1f} min, load {load_start:.1f} -> {os.getloadavg()[0]:.1f})")
    shutdown_distributed()
    return 0 if all(math.isfinite(row["final_val_loss"]) for row in summary["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
