"""The algorithm surface, in the shape of Composer's `Algorithm.match/apply`: a training loop fires a few events,
and each algorithm that matches one acts on the shared `State`.

Events, in the order a step fires them:
- STEP_START: once per optimizer step, before its first micro-batch.
- AFTER_LOSS: once per micro-batch, between forward and backward; `state.loss` may be changed (a penalty added).
- STEP_END: once the optimizer step is taken (and, in pretraining, found finite); may replace `state.engine`;
  what `apply` returns goes into the step's metrics record.
At checkpoint: an algorithm's `state_dict` / `load_state_dict` travel in the engine's checkpoints
(`register_checkpoint_state`), so a resumed run continues where it was.

There is no after-backward event: the gradients live in DeepSpeed's (partitioned) buffers there, so a speed-up that
shapes them does it through the loss, before backward, as EarlyBERT's L1 penalty does.
"""
from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_pld.engine import DsPldEngine

Metrics = dict[str, Any]


class Event(enum.Enum):
    STEP_START = "step_start"
    AFTER_LOSS = "after_loss"
    STEP_END = "step_end"


@dataclass
class State:
    """What algorithms see and may change. `build_engine(model, start_step)` is the trainer's: an engine for another
    model whose learning-rate schedule continues at `start_step` (its optimizer groups, scheduler and checkpointed
    state are the trainer's business)."""

    engine: DsPldEngine
    build_engine: Callable[[nn.Module, int], DsPldEngine]
    loss: torch.Tensor | None = None

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
        self.engine.destroy()
        self.engine = self.build_engine(model, step)
        self.engine.set_progress(step, samples)


class Algorithm(abc.ABC):
    """One speed-up. `name` keys its state in checkpoints; stateless algorithms keep the empty default."""

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
    """Apply every algorithm that matches `event`, in list order; their metrics merged."""
    metrics: Metrics = {}
    for algorithm in algorithms:
        if algorithm.match(event, state):
            metrics.update(algorithm.apply(event, state) or {})
    return metrics


def register_checkpoint_state(engine: DsPldEngine, algorithms: Sequence[Algorithm]) -> None:
    """Have `engine` save and restore the algorithms' state with its checkpoints (`engine.extra_state`); call it
    before loading a checkpoint, and on every engine an algorithm swaps in."""
    engine.extra_state.update({algorithm.name: algorithm for algorithm in algorithms})
