"""EarlyBERT (Chen et al. 2021) as an algorithm: search, detect, draw, prune and rebuild, for any trainer.

While the model has slimming coefficients and no ticket is drawn:
- STEP_START (once): keep the rewind point, the weights before the search, when `rewind` is set;
- AFTER_LOSS: add the L1 penalty on the coefficients to the loss;
- STEP_END: observe the masks; when the detector fires, draw the ticket, prune the model for real (coefficients
  folded in; from the rewind point with `rewind`) and swap in an engine for it at the same step. Adam's moments are
  carried over, sliced like the weights, where the optimizer allows (`carry_optimizer_state`, not with `rewind`).
At checkpoint: the detector's state (mask window, drawn step), so a resumed search goes on and a drawn one stays so.
The model is pruned by `prune(model, ticket, fp32 weights)`: `prune_model` for a BertForPreTraining, or the
trainer's own for a model that wraps one (GLUE's classifier).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from torch import nn

from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import EarlyBertConfig, EarlyBird, Ticket, prune_model, slimming_layers
from ds_pld.earlybert.prune import prune_adam_moments
from ds_pld.optim.moments import full_precision_state, read_moments, write_moments

Prune = Callable[[nn.Module, Ticket, Mapping[str, torch.Tensor]], nn.Module]


class EarlyBert(Algorithm):
    """`rewind_path`: where to keep the rewind point (written once by rank 0, read by every rank at the draw, so a
    resumed search still finds it); without it the point is kept in memory."""

    name = "earlybert"

    def __init__(self, config: EarlyBertConfig, prune: Prune = prune_model, rewind_path: str | Path | None = None):
        self.config = config
        self.bird = EarlyBird(config)
        self.prune = prune
        self.rewind_path = None if rewind_path is None else Path(rewind_path)
        self._rewind_weights: dict[str, torch.Tensor] | None = None
        self._rewind_kept = not config.rewind
        self.moments_carried: bool | None = None  # set at the draw

    def match(self, event: Event, state: State) -> bool:
        return not self.bird.drawn and bool(slimming_layers(state.model))

    def apply(self, event: Event, state: State) -> Metrics | None:
        if event is Event.STEP_START:
            if not self._rewind_kept:
                self._keep_rewind_point(state.model)
            return None
        if event is Event.AFTER_LOSS:
            state.loss = state.loss + self.bird.penalty(state.model)
            return None
        distance = self.bird.observe(state.step, state.model)
        metrics: Metrics = {} if distance is None else {"earlybert_distance": distance}
        if self.bird.should_draw(state.step):
            metrics.update(self._draw(state))
        return metrics

    def _keep_rewind_point(self, model: nn.Module) -> None:
        self._rewind_kept = True
        if self.rewind_path is None:
            self._rewind_weights = full_precision_state(model)
            return
        saved = self.rewind_path.exists()
        dist.barrier()  # every rank has looked before rank 0 writes
        if not saved:
            weights = full_precision_state(model)  # a collective under ZeRO: on every rank
            if dist.get_rank() == 0:
                tmp = self.rewind_path.with_suffix(".tmp")
                torch.save(weights, tmp)
                tmp.replace(self.rewind_path)
            dist.barrier()  # the file is there for every rank's draw

    def _rewind_point(self) -> dict[str, torch.Tensor]:
        if self._rewind_weights is not None:
            return self._rewind_weights
        if self.rewind_path is None or not self.rewind_path.exists():
            raise ConfigError("EarlyBERT 'rewind' is set but the weights before the search were not kept (a search "
                              "resumed without a rewind file)")
        return torch.load(self.rewind_path, weights_only=True)

    def _draw(self, state: State) -> Metrics:
        step, model = state.step, state.model
        ticket = self.bird.draw(step, model)
        weights = self._rewind_point() if self.config.rewind else full_precision_state(model)
        carry = not self.config.rewind and self.config.carry_optimizer_state
        moments = read_moments(state.engine) if carry else None
        slim = self.prune(model, ticket, weights).float()
        state.replace_model(slim)
        self.moments_carried = moments is not None and write_moments(
            state.engine, prune_adam_moments(moments, weights, ticket, slim.config), step)
        self._rewind_weights = None
        return {"earlybert_drawn_step": step, "earlybert_heads": sum(slim.config.layer_heads),
                "earlybert_ffn": sum(slim.config.layer_intermediate),
                "earlybert_moments_carried": self.moments_carried,
                **ticket.summary()}

    def report(self) -> dict[str, Any]:
        """For a run's summary: the drawn step, the distance that fired, the ticket and its per-layer counts."""
        ticket = self.bird.drawn_ticket
        if ticket is None:
            return {"drawn_at_step": None}
        return {"drawn_at_step": self.bird.drawn_step, "distance": self.bird.last_distance,
                "moments_carried": self.moments_carried, "ticket": ticket.to_dict(), **ticket.summary()}

    def state_dict(self) -> dict[str, Any]:
        return self.bird.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bird.load_state_dict(state)
