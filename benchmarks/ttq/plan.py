"""What the study runs: the regimes, their arms and seeds, and the groups of runs that train interleaved in one
process. A run is identified by everything that decides its result (not by the regime that asked for it), so a run
two regimes need, such as the pre-LN baseline at the chosen learning rate, is trained once and shared.

Order, as the dependencies allow (`ready_groups` returns what can start given the results so far):
1. learning-rate sweeps, seed 0: the pre-LN baseline and the post-LN baseline over the same grid; the pre-LN
   learning rate of every regime is the pre-LN sweep's best, the post-LN one the post-LN sweep's best;
2. data-rich, seed 0: PLD at each theta_bar of the sweep; meanwhile, the arms without PLD of every regime and seed;
3. with theta_bar chosen (lowest validation loss of the sweep): the PLD arms of every regime and seed.
A (regime, seed) group holds the arms known when it starts, so PLD arms may train in a later group than their
baseline; each arm's clock is its own process CPU time (or synchronized wall time), so that does not bias them.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ARMS = ("baseline", "pld", "earlybert", "pld+earlybert")
LTD_ARMS = ("random-ltd", "pld+random-ltd", "pld+earlybert+random-ltd")  # the data-rich regime only
DATA_RICH, DATA_LIMITED, POST_LN = "data-rich", "data-limited", "post-ln"
REGIMES = (DATA_RICH, DATA_LIMITED, POST_LN)


@dataclass(frozen=True)
class StudySettings:
    """Everything the study's runs share, set once from the command line (docs/benchmarks.md names the values)."""

    budget_s: float
    layers: int
    hidden: int
    heads: int
    batch: int
    lr_grid: tuple[float, ...]
    thetas: tuple[float, ...]
    seeds: tuple[int, ...]
    warmup: float = 0.06
    gamma_budget: float = 100.0
    dropout: float = 0.0
    limited_dropout: float = 0.1
    limited_sequences: int = 2048
    head_prune: float = 1 / 3
    ffn_prune: float = 0.4
    search_fraction: float = 0.1
    earlybert_lambda: float = 1e-4
    ltd_arms: tuple[str, ...] = LTD_ARMS
    ltd_start: float = 0.5  # random-LTD keeps this share of the tokens at first ...
    ltd_full_at: float = 0.7  # ... and every token from this share of the budget on
    budget_factors: Mapping[str, float] = field(default_factory=dict)  # --steps_factor: a manual override per arm


@dataclass(frozen=True)
class RunSpec:
    """One training run. `theta` only for PLD arms; `train_sequences` only in the data-limited regime."""

    arm: str
    seed: int
    lr: float
    layer_norm: str = "pre"
    theta: float | None = None
    dropout: float = 0.0
    train_sequences: int | None = None
    budget_s: float = 0.0

    @property
    def key(self) -> str:
        """A readable, unique name: the arm, seed and a hash of the whole spec."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.arm.replace('+', '_')}-{self.layer_norm}ln-s{self.seed}-{digest}"

    @property
    def uses_pld(self) -> bool:
        return "pld" in self.arm.split("+")

    @property
    def uses_earlybert(self) -> bool:
        return "earlybert" in self.arm.split("+")

    @property
    def uses_random_ltd(self) -> bool:
        return "random-ltd" in self.arm.split("+")


@dataclass(frozen=True)
class Group:
    """Runs trained interleaved in one process; `name` is for logs."""

    name: str
    runs: tuple[RunSpec, ...]


def spec(settings: StudySettings, arm: str, seed: int, lr: float, **changes: Any) -> RunSpec:
    base = RunSpec(arm=arm, seed=seed, lr=lr, dropout=settings.dropout,
                   budget_s=settings.budget_s * settings.budget_factors.get(arm, 1.0))
    return replace(base, **changes)


def best_loss(result: Mapping[str, Any] | None) -> float:
    """A run's lowest validation loss; inf for a diverged run (so it never wins a sweep)."""
    if result is None or result.get("diverged_at") is not None:
        return math.inf
    return min(float(point["val_loss"]) for point in result["curve"])


def best(candidates: Mapping[float, RunSpec], results: Mapping[str, Any]) -> float | None:
    """The candidate value whose run reached the lowest validation loss (ties: the larger value); None until every
    run is done."""
    if any(run.key not in results for run in candidates.values()):
        return None
    return min(candidates, key=lambda value: (best_loss(results[candidates[value].key]), -value))


def lr_sweep(settings: StudySettings, layer_norm: str) -> dict[float, RunSpec]:
    return {lr: spec(settings, "baseline", settings.seeds[0], lr, layer_norm=layer_norm) for lr in settings.lr_grid}


def theta_sweep(settings: StudySettings, lr: float) -> dict[float, RunSpec]:
    return {theta: spec(settings, "pld", settings.seeds[0], lr, theta=theta) for theta in settings.thetas}


@dataclass(frozen=True)
class Choices:
    """What the sweeps picked so far (None: not yet known)."""

    pre_lr: float | None
    post_lr: float | None
    theta: float | None


def choices(settings: StudySettings, results: Mapping[str, Any]) -> Choices:
    pre_lr = best(lr_sweep(settings, "pre"), results)
    theta = None if pre_lr is None else best(theta_sweep(settings, pre_lr), results)
    return Choices(pre_lr, best(lr_sweep(settings, "post"), results), theta)


def regime_runs(settings: StudySettings, regime: str, picked: Choices) -> dict[tuple[str, int], RunSpec] | None:
    """(arm, seed) -> run of a regime, for the arms whose settings are chosen so far (PLD arms wait for theta_bar);
    None before the regime's learning rate is known."""
    if picked.pre_lr is None:
        return None
    lr, theta = picked.pre_lr, picked.theta
    if regime == POST_LN:
        if picked.post_lr is None:
            return None
        arms = {"post-ln baseline": dict(arm="baseline", lr=picked.post_lr, layer_norm="post"),
                "pre-ln baseline": dict(arm="baseline", lr=lr), "pre-ln + pld": dict(arm="pld", lr=lr, theta=theta)}
    else:
        extra: dict[str, Any] = {}
        if regime == DATA_LIMITED:
            extra = dict(dropout=settings.limited_dropout, train_sequences=settings.limited_sequences)
        names = ARMS + (settings.ltd_arms if regime == DATA_RICH else ())
        arms = {arm: dict(arm=arm, lr=lr, theta=theta if "pld" in arm else None, **extra) for arm in names}
    return {(name, seed): spec(settings, seed=seed, **fields) for name, fields in arms.items()
            for seed in settings.seeds if "pld" not in fields["arm"] or theta is not None}


def ready_groups(settings: StudySettings, results: Mapping[str, Any]) -> list[Group]:
    """Groups whose runs are all determined and not all finished (finished runs are left out of them), in order."""
    picked = choices(settings, results)
    groups = [Group("lr sweep pre-LN", tuple(lr_sweep(settings, "pre").values())),
              Group("lr sweep post-LN", tuple(lr_sweep(settings, "post").values()))]
    if picked.pre_lr is not None:
        groups.append(Group("theta sweep, data-rich seed 0", tuple(theta_sweep(settings, picked.pre_lr).values())))
    for regime in (DATA_RICH, POST_LN, DATA_LIMITED):  # the post-LN comparison needs 2 runs of its own: first
        runs = regime_runs(settings, regime, picked)
        for seed in settings.seeds if runs else ():
            groups.append(Group(f"{regime} seed {seed}",
                                tuple(run for (_, s), run in runs.items() if s == seed)))
    ready = []
    seen: set[str] = set()
    for group in groups:
        todo = tuple(run for run in group.runs if run.key not in results and run.key not in seen)
        seen.update(run.key for run in todo)
        if todo:
            ready.append(Group(group.name, todo))
    return ready


def count_runs(settings: StudySettings) -> int:
    """How many runs the whole study trains (identical runs once), whatever the sweeps pick."""
    picked = Choices(settings.lr_grid[0], settings.lr_grid[0], settings.thetas[0])
    keys = {run.key for norm in ("pre", "post") for run in lr_sweep(settings, norm).values()}
    keys |= {run.key for run in theta_sweep(settings, picked.pre_lr).values()}
    for regime in REGIMES:
        keys |= {run.key for run in (regime_runs(settings, regime, picked) or {}).values()}
    return len(keys)
