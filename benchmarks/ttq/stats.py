"""Seeds and significance: how the study turns per-seed results into a verdict.

The rule (stated in docs/benchmarks.md): a difference between an arm and the baseline counts as a win or a loss only
when it is larger than 2 standard errors, with at least 3 seeds; anything else is "no difference". Arms with the same
seed share initial weights and data order, so differences are paired by seed: the standard error is that of the
per-seed differences, sd(d) / sqrt(n).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SEEDS = 3
Z = 2.0  # standard errors a difference must exceed


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and standard error of a set of per-seed values."""

    n: int
    mean: float
    sd: float

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.inf

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "se": self.se}


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(len(values), statistics.fmean(values), sd)


@dataclass(frozen=True)
class Comparison:
    """`diff` = arm - reference, paired by seed; `verdict` is "better", "worse" or "no difference" for a quantity
    where lower is better (a loss, a time)."""

    diff: Summary
    verdict: str

    def to_dict(self) -> dict[str, object]:
        return {"diff": self.diff.to_dict(), "verdict": self.verdict}


def compare_paired(arm: dict[int, float], reference: dict[int, float], lower_is_better: bool = True) -> Comparison:
    """Paired comparison over the seeds both have. Fewer than MIN_SEEDS pairs: always "no difference"."""
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        raise ValueError("no seed in common")
    diff = summarize([arm[s] - reference[s] for s in seeds])
    verdict = "no difference"
    if diff.n >= MIN_SEEDS and abs(diff.mean) > Z * diff.se:
        better = diff.mean < 0 if lower_is_better else diff.mean > 0
        verdict = "better" if better else "worse"
    return Comparison(diff, verdict)


def below_limit(values: Sequence[float | None], limit: float) -> bool:
    """Whether the mean is below `limit` by more than 2 standard errors (every seed must have a value)."""
    if len(values) < MIN_SEEDS or any(v is None for v in values):
        return False
    s = summarize([float(v) for v in values])  # type: ignore[arg-type]
    return s.mean + Z * s.se < limit


def time_to_reach(curve: Sequence[dict[str, float]], target: float, key: str = "val_loss") -> float | None:
    """First training time at which `key` is <= target, linear between evaluations; None if never."""
    if curve and curve[0][key] <= target:
        return curve[0]["time_s"]
    for before, after in zip(curve, curve[1:]):
        if after[key] <= target:
            share = (before[key] - target) / (before[key] - after[key])
            return before["time_s"] + share * (after["time_s"] - before["time_s"])
    return None


def band(curves: Sequence[Sequence[dict[str, float]]], grid: Sequence[float], key: str = "val_loss"
         ) -> tuple[list[float], list[float]]:
    """Mean and standard deviation over seeds of `key`, each curve interpolated linearly at the `grid` times (a time
    outside a curve takes its nearest end)."""
    def at(curve: Sequence[dict[str, float]], t: float) -> float:
        if t <= curve[0]["time_s"]:
            return curve[0][key]
        for before, after in zip(curve, curve[1:]):
            if t <= after["time_s"]:
                span = after["time_s"] - before["time_s"]
                share = 0.0 if span <= 0 else (t - before["time_s"]) / span
                return before[key] + share * (after[key] - before[key])
        return curve[-1][key]

    means, sds = [], []
    for t in grid:
        s = summarize([at(curve, t) for curve in curves])
        means.append(s.mean)
        sds.append(s.sd)
    return means, sds
