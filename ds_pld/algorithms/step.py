"""One optimizer step through DeepSpeed with the algorithms' events: the part of a training loop that pretraining
and GLUE fine-tuning share."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ds_pld.algorithms.base import Algorithm, Event, State, run_event


@dataclass
class StepResult:
    """`loss_sum`: the micro-batches' losses summed on the device (no host sync); `layers_run`: their summed
    `layers_run` (models that report it); `micro_batches`: how many there were."""

    loss_sum: torch.Tensor
    layers_run: float
    micro_batches: int

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(1, self.micro_batches)


def optimizer_step(state: State, algorithms: Sequence[Algorithm],
                   batches: Iterable[Mapping[str, torch.Tensor]]) -> StepResult:
    """Forward, backward and `engine.step()` for each micro-batch of `batches` (on the engine's device; the last one
    reaches DeepSpeed's accumulation boundary), firing STEP_START once and AFTER_LOSS per micro-batch. STEP_END is
    the caller's to fire: pretraining first checks, over all ranks, that the step is finite."""
    run_event(algorithms, Event.STEP_START, state)
    loss_sum = torch.zeros((), device=state.engine.device)
    layers_run, count = 0.0, 0
    for batch in batches:
        out = state.engine(**batch)
        state.loss = out.loss
        run_event(algorithms, Event.AFTER_LOSS, state)
        state.engine.backward(state.loss)
        state.engine.step()
        loss_sum += out.loss.detach().float()
        layers_run += getattr(out, "layers_run", None) or 0
        count += 1
    state.loss = None
    return StepResult(loss_sum, layers_run, count)
