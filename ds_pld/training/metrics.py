"""The metrics stream: one JSON line per step in `<output_dir>/metrics.jsonl`, strict JSON documents for summaries,
and the PNG of the curves."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MetricsFile:
    """Appends one JSON object per line, flushed at once so a killed job keeps everything logged so far. On resume,
    lines of steps after the checkpoint (logged, then lost with the crash) are dropped so the file has no repeats."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._handle.flush()

    def rewind(self, step: int) -> None:
        """Drop the lines after `step` (a divergence rollback re-trains those steps)."""
        self._handle.close()
        kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(strict_json(line), allow_nan=False) + "\n" for line in kept))
        self._handle = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._handle.close()


def strict_json(value: Any) -> Any:
    """NaN and infinities as null: Python's json writes bare `NaN` tokens that strict JSON readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """A JSON document (summaries, a GLUE run's metrics), strict like the stream: non-finite numbers as null."""
    path = Path(path)
    path.write_text(json.dumps(strict_json(value), indent=2, allow_nan=False))
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines (a line cut by a kill is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training and validation loss (left axis) and theta (right axis) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    valid = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    theta = [(r["step"], r["pld_theta"]) for r in records if r.get("pld_theta") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MLM loss")
    handles, labels = ax.get_legend_handles_labels()
    if theta:
        right = ax.twinx()
        right.plot(*zip(*theta), color="tab:green", linestyle="--", label="PLD theta")
        right.set_ylabel("theta")
        right.set_ylim(0, 1.05)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title("ds-pld pretraining")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
