"""The worked examples of docs/continued_pretraining.md, on the CPU (2 ranks), and their figures.

1. Two phases: phase 1 at 128 tokens (ds_configs/cpu_small.json on the embedded corpus, PLD on, 120 steps), phase 2
   at 512 from phase 1's final/ (ds_configs/cpu_small_phase2.json, 30 steps: the position table grows from 128 to
   512 rows, theta continues from phase 1's last step, `start_step` 120).
2. Continued pretraining: phase 1 exported to Hugging Face (launch/export_hf.py), the WordNet glosses (dict-wn, from
   launch/fetch_corpus.sh) prepared with that model's tokenizer, then `--init_from` the export against the same run
   from random weights. Each is scored before its first step too, by a one-step run at learning rate 0 (the
   trainer's own validation, same sequences and masks).

    python launch/phases_example.py [--out runs/phases_example] [--wordnet runs/corpus/root/usr/share/dictd/wn.dict.dz]

Writes docs/figures/two_phase.png, docs/figures/continued_pretraining.png and docs/figures/phases_example.json
(the numbers the doc quotes, with each stage's wall time). Runs (and the WordNet data) are reused when they are
complete, so an interrupted invocation continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIGURES = ROOT / "docs" / "figures"
TRAIN = str(ROOT / "launch" / "train.py")
QUIET = ["--set", "wandb.enabled=false"]


def run(cmd: list[str]) -> float:
    """Run a command from the checkout; its wall time."""
    print("+", " ".join(cmd), flush=True)
    started = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.monotonic() - started


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(out: Path, config: str, *flags: str, ranks: int = 2) -> float:
    """One launch/train.py job on `ranks` CPU ranks (skipped when it finished before)."""
    if (out / "summary.json").is_file():
        return 0.0
    return run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                str(free_port()), TRAIN,
                "--deepspeed_config", str(ROOT / "ds_configs" / config), "--output_dir", str(out), *QUIET, *flags])


def metrics(out: Path) -> list[dict]:
    from ds_pld.training.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def series(records: list[dict], key: str, offset: int = 0) -> tuple[list[int], list[float]]:
    pairs = [(r["step"] + offset, r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_two_phases(phase1: list[dict], phase2: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = phase1[-1]["step"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for records, shift, name, color in ((phase1, 0, "phase 1 (128 tokens)", "tab:blue"),
                                        (phase2, offset, "phase 2 (512 tokens)", "tab:orange")):
        ax.plot(*series(records, "loss", shift), color=color, linewidth=0.8, alpha=0.6, label=f"{name}: train loss")
        ax.plot(*series(records, "val_loss", shift), "o-", color=color, label=f"{name}: validation loss")
    ax.axvline(offset, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step (phase 2 counted after phase 1)")
    ax.set_ylabel("MLM loss")
    right = ax.twinx()
    steps, thetas = series(phase1, "pld_theta")
    steps2, thetas2 = series(phase2, "pld_theta", offset)
    right.plot(steps + steps2, thetas + thetas2, color="tab:green", linestyle="--", label="PLD theta")
    right.set_ylim(0, 1.05)
    right.set_ylabel("theta")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, loc="upper right", fontsize=8)
    ax.set_title("Two phases on the CPU: bert-mini, 128 then 512 tokens, PLD on")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_continued(runs: dict[str, tuple[float, list[dict]]], source_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, (start, records)), color in zip(runs.items(), ("tab:blue", "tab:red")):
        steps, values = series(records, "val_loss")
        ax.plot([0, *steps], [start, *values], "o-", color=color, label=f"{name}: validation loss")
        ax.plot(*series(records, "loss"), color=color, linewidth=0.8, alpha=0.4, label=f"{name}: train loss")
    ax.axhline(source_loss, color="gray", linestyle=":", linewidth=1,
               label=f"source model before any step ({source_loss:.2f})")
    ax.set_xlabel("optimizer step on WordNet")
    ax.set_ylabel("MLM loss")
    ax.legend(fontsize=8)
    ax.set_title("Continued pretraining on WordNet from a Hugging Face export vs random init")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "phases_example"))
    parser.add_argument("--wordnet", default=str(ROOT / "runs" / "corpus" / "root" / "usr" / "share" / "dictd" /
                                                 "wn.dict.dz"), help="dict-wn's wn.dict.dz (launch/fetch_corpus.sh)")
    parser.add_argument("--phase1_steps", type=int, default=120,
                        help="phase 1's steps (cpu_small_phase2.json's start_step is 120)")
    parser.add_argument("--continued_steps", type=int, default=40)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not Path(args.wordnet).is_file():
        print(f"error: {args.wordnet} not found: run `bash launch/fetch_corpus.sh runs/corpus` first", file=sys.stderr)
        return 2
    seconds: dict[str, float] = {}

    # 1. Two phases.
    seconds["phase1"] = train(out / "phase1", "cpu_small.json", "--set", "data.max_seq_length=128",
                              "--max_steps", str(args.phase1_steps))
    seconds["phase2"] = train(out / "phase2", "cpu_small_phase2.json", "--init_from", str(out / "phase1" / "final"),
                              "--set", f"progressive_layer_drop.start_step={args.phase1_steps}")

    # 2. Continued pretraining from the Hugging Face export, on WordNet prepared with the export's tokenizer.
    hf, data = out / "hf", out / "data_wordnet"
    if not (hf / "config.json").is_file():
        seconds["export"] = run([sys.executable, "launch/export_hf.py", "--model", str(out / "phase1" / "final"),
                                 "--output_dir", str(hf)])
    if not (data / "meta.json").is_file():
        seconds["prepare"] = run([sys.executable, "launch/prepare_data.py", "--output_dir", str(data), "--corpus",
                                  args.wordnet, "--tokenizer", str(hf), "--max_seq_length", "128", "--num_proc",
                                  "2"])
    # A warmup (10% of the steps) for both: Adam's moments start fresh, and a full-size first step would throw the
    # loaded model off before it is used (cpu_small.json's 2% is no step at all over 40 steps).
    common = ["--data", str(data), "--set", "training.eval_every=10", "--set", "training.eval_batches=8",
              "--set", "training.checkpoint_every=1000", "--set", "lr_schedule.warmup_proportion=0.1"]
    runs: dict[str, tuple[float, list[dict]]] = {}
    for name, init in (("from the export", ["--init_from", str(hf)]), ("random init", [])):
        folder = "continued" if init else "random"
        # Step 0: one step at learning rate 0 leaves the weights as they start; its validation scores them.
        seconds[f"{folder}_step0"] = train(out / f"{folder}_step0", "cpu_small.json", *common, *init,
                                           "--max_steps", "1", "--set", "optimizer.params.lr=0")
        seconds[folder] = train(out / folder, "cpu_small.json", *common, *init,
                                "--max_steps", str(args.continued_steps))
        runs[name] = (metrics(out / f"{folder}_step0")[0]["val_loss"], metrics(out / folder))

    phase1, phase2 = metrics(out / "phase1"), metrics(out / "phase2")
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_two_phases(phase1, phase2, FIGURES / "two_phase.png")
    source_loss = runs["from the export"][0]
    plot_continued(runs, source_loss, FIGURES / "continued_pretraining.png")

    def summary(records: list[dict]) -> dict:
        val = [r for r in records if r.get("val_loss") is not None]
        return {"steps": records[-1]["step"], "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                "first_val": [val[0]["step"], val[0]["val_loss"]], "last_val": [val[-1]["step"], val[-1]["val_loss"]],
                "first_theta": records[0].get("pld_theta"), "last_theta": records[-1].get("pld_theta"),
                "median_step_time": sorted(r["step_time"] for r in records)[len(records) // 2]}

    record = FIGURES / "phases_example.json"
    # Wall seconds of each stage, kept from earlier invocations for the stages this one reused.
    earlier = json.loads(record.read_text()).get("seconds", {}) if record.is_file() else {}
    results = {"phase1": summary(phase1), "phase2": summary(phase2),
               "continued": {name: {"step0_val": start, **summary(records)} for name, (start, records) in runs.items()},
               "seconds": {**earlier, **{k: round(v, 1) for k, v in seconds.items() if v}}}
    record.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
