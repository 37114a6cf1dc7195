"""The budget protocol (as in Kaddour et al., "No Train No Gain", 2023): every arm gets the same training-time budget,
and its schedules are planned for that budget, not for a step count.

The schedules are driven by the share of the budget spent, read from the arm's own clock before each step:
- learning rate: linear warmup over `warmup` of the budget, then linear decay to 0 at the budget's end;
- PLD's theta: theta(p) = (1 - theta_bar) * exp(-gamma_budget * p) + theta_bar, p = share spent; gamma_budget = 100
  is the paper's gamma 0.001 over its 100K steps, so theta is within 1% of theta_bar after the same 5% of the run.

Why driven by the clock rather than by steps planned from a calibration: the cost of a PLD step falls as theta
falls and an EarlyBERT step gets cheaper once its ticket is drawn, at a step no calibration knows in advance. A
schedule keyed on time spent decays each arm's learning rate to 0 exactly when its budget ends, whatever its speed,
so an arm whose steps are cheaper simply takes more of them. The one step-counted piece is EarlyBERT's longest
search, which `plan_steps` sizes from a short calibration of the full model's step time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

ClockKind = Literal["cpu", "wall"]


@dataclass(frozen=True)
class Budget:
    """`seconds` of training per arm (evaluation is off the clock); schedules as in the module docstring."""

    seconds: float
    warmup: float = 0.06
    gamma: float = 100.0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"budget seconds = {self.seconds} must be > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup = {self.warmup} must be in [0, 1)")

    def progress(self, clock: float) -> float:
        """Share of the budget spent, in [0, 1]."""
        return min(1.0, max(0.0, clock / self.seconds))

    def spent(self, clock: float) -> bool:
        return clock >= self.seconds

    def lr_multiplier(self, clock: float) -> float:
        """Fraction of the peak learning rate for the step that starts at `clock`."""
        p = self.progress(clock)
        if p < self.warmup:
            return max(p / self.warmup, 1e-3)  # the very first step gets a sliver, not 0
        return max(0.0, (1.0 - p) / (1.0 - self.warmup))

    def theta(self, clock: float, theta_bar: float) -> float:
        """PLD's keep-probability schedule over the budget: 1 at the start, theta_bar soon after."""
        return (1.0 - theta_bar) * math.exp(-self.gamma * self.progress(clock)) + theta_bar

    def tokens(self, clock: float, seq: int, start_fraction: float, full_at: float, multiple: int = 8) -> int:
        """Random-LTD's kept length over the budget: DeepSpeed's fixed_linear schedule (from `start_fraction` of
        `seq`, rounded down to a `multiple`, to all of it at `full_at` of the budget) on the budget's share spent."""
        low = start_fraction * seq
        kept = int(low + (seq - low) * min(1.0, self.progress(clock) / full_at))
        return min(seq, max(multiple, kept - kept % multiple))


def plan_steps(budget: Budget, step_seconds: float, fraction: float = 1.0) -> int:
    """Steps that fit in `fraction` of the budget at `step_seconds` a step (at least 1)."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds = {step_seconds} must be > 0")
    return max(1, round(fraction * budget.seconds / step_seconds))


class Clock:
    """Seconds of training on one arm's account, read through ds_pld.timing's StepTimer. `cpu`: this process's CPU
    time, which on a dedicated core is its wall time and, unlike wall time, does not grow when other jobs share the
    machine (with one torch thread; more threads spin while they wait and inflate it). `wall`: perf_counter. Either
    way `device` (none: the CPU) is synchronized before each reading, so queued GPU work is counted."""

    def __init__(self, kind: ClockKind, device: str | None = None):
        from ds_pld.timing import StepTimer  # here: the study's workers pick the accelerator before ds_pld is imported

        self.kind = kind
        self.timer = StepTimer(device, time.process_time if kind == "cpu" else time.perf_counter)
        self.total = 0.0

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> float:
        """Add the time since `start` and return it."""
        elapsed = self.timer.stop()
        self.total += elapsed
        return elapsed
