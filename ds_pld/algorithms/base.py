"""The algorithm surface, in the shape of Composer's `Algorithm.match/apply`: a training loop fires a few events,
and each algorithm (a speed-up) or callback (the loop's own duties: divergence check, evaluation, metrics,
checkpoints) that matches one acts on the shared `State`.

Events, in the order a step fires them:
- STEP_START: once per optimizer step, before its first micro-batch.
- AFTER_LOSS: once per micro-batch, between forward and backward; `state.loss` may be changed (a penalty added).
- STEP_END: once the optimizer step is taken and its record (`state.record`) holds the step's loss; the divergence
  check comes first, then the speed-ups, which may replace `state.engine`; what `apply` returns goes into the record.
- AFTER_STEP: the record is complete: evaluation adds to it, then it is logged and a checkpoint may be written.
- FIT_END: the last step is done: final outputs.
At checkpoint: an algorithm's `state_dict` / `load_state_dict` travel in the engine's checkpoints
(`register_checkpoint_state`), so a resumed run continues where it was.

There is no after-backward event: the gradients live in DeepSpeed's (partitioned) buffers there, so a speed-up that
shapes them does it through the loss, before backward, as EarlyBERT's L1 penalty does.
"""
from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from ds_pld.plugin_state import continue_progress, plugin_of

Metrics = dict[str, Any]


class Event(enum.Enum):
    STEP_START = "step_start"
    AFTER_LOSS = "after_loss"
    STEP_END = "step_end"
    AFTER_STEP = "after_step"
    FIT_END = "fit_end"


@dataclass
class State:
    """What algorithms see and may change. `build_engine(model, start_step)` is the trainer's: an engine for another
    model whose learning-rate schedule continues at `start_step` (its optimizer groups, scheduler and checkpointed
    state are the trainer's business). `record`: the metrics record of the step being finished; `stopping`: the
    loop stops after this step (a stop request)."""

    engine: DeepSpeedEngine
    build_engine: Callable[[nn.Module, int], DeepSpeedEngine]
    loss: torch.Tensor | None = None
    record: dict[str, Any] = field(default_factory=dict)
    stopping: bool = False

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    @property
    def step(self) -> int:
        """Optimizer steps taken: the step being computed is step + 1 until STEP_END, where it is step."""
        return self.engine.global_steps

    def replace_model(self, model: nn.Module) -> None:
        """Swap the engine for one around `model`, continuing the step count, samples seen and LR schedule."""
        step, samples = self.engine.global_steps, self.engine.global_samples
        # DeepSpeed's random-LTD schedule lives in the engine (its checkpoints carry it): the new one continues it.
        token_schedule = self.engine.random_ltd_scheduler.state_dict() if self.engine.random_ltd_enabled() else None
        plugin_of(self.engine).detach()
        self.engine.destroy()
        self.engine = self.build_engine(model, step)
        continue_progress(self.engine, step, samples)
        if token_schedule is not None:
            self.engine.random_ltd_scheduler.load_state_dict(token_schedule)


class Algorithm(abc.ABC):
    """One speed-up or callback. `name` keys its state in checkpoints; stateless ones keep the empty default."""

    name: str

    @abc.abstractmethod
    def match(self, event: Event, state: State) -> bool:
        """Whether `apply` should run on this event now."""

    @abc.abstractmethod
    def apply(self, event: Event, state: State) -> Metrics | None:
        """Act on the event; metrics returned at STEP_END go into the step's record."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore by default."""
        return None


def run_event(algorithms: Sequence[Algorithm], event: Event, state: State) -> Metrics:
    """Apply every algorithm that matches `event`, in list order; returns their metrics merged, which also go into
    `state.record` as they come, so a later one (the metrics log) sees an earlier one's."""
    metrics: Metrics = {}
    for algorithm in algorithms:
        if algorithm.match(event, state):
            out = algorithm.apply(event, state) or {}
            metrics.update(out)
            state.record.update(out)
    return metrics


def register_checkpoint_state(engine: DeepSpeedEngine, algorithms: Sequence[Algorithm]) -> None:
    """Have `engine` save and restore the algorithms' state with its checkpoints (the plugin's `extra_state`); call
    it before loading a checkpoint, and on every engine an algorithm swaps in."""
    plugin_of(engine).extra_state.update({algorithm.name: algorithm for algorithm in algorithms})
