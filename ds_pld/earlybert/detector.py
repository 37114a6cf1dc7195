"""The early-bird detector: the L1 penalty of the search, and when to draw the ticket.

Every `check_every` optimizer steps the masks the coefficients would give now are pushed into a FIFO of the last
`window` masks; once the FIFO is full, the distance is the largest normalized Hamming distance between the newest
mask and each older one. The search has converged when that distance is <= `epsilon`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ds_pld.earlybert.coefficients import check_materialized, read_coefficients, require_slimming_layers
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.earlybert.masks import compute_masks, flatten_masks, hamming_distance
from ds_pld.earlybert.ticket import Ticket


class EarlyBird:
    """Search-phase state: the mask FIFO, the last distance and, once drawn, the ticket. Checkpointable through
    `state_dict` / `load_state_dict` (put it in `engine.extra_state`), so a resumed search continues where it was.
    `observe` and `ticket` read the optimizer's fp32 coefficients, a collective under DeepSpeed: call them on every
    rank at the same steps."""

    def __init__(self, config: EarlyBertConfig):
        self.config = config
        self.masks: deque[torch.Tensor] = deque(maxlen=config.window)
        self.last_distance: float | None = None
        self.last_step: int | None = None
        self.drawn_step: int | None = None
        self.drawn_ticket: Ticket | None = None

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """lambda_head * sum|c_head| + lambda_ffn * sum|c_ffn|: the sparsity term added to the loss while searching
        (its gradient wrt each coefficient is lambda * sign(c))."""
        layers = require_slimming_layers(model)
        for i, layer in enumerate(layers):
            check_materialized(layer.head_coef, f"layer {i} head_coef")
            check_materialized(layer.ffn_coef, f"layer {i} ffn_coef")
        head = torch.stack([layer.head_coef.float().abs().sum() for layer in layers]).sum()
        ffn = torch.stack([layer.ffn_coef.float().abs().sum() for layer in layers]).sum()
        return self.config.lambda_head * head + self.config.lambda_ffn * ffn

    def current_masks(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head masks, FFN masks) the model's coefficients give now."""
        heads, ffn = read_coefficients(model)
        return compute_masks(heads, ffn, self.config)

    def observe(self, step: int, model: nn.Module) -> float | None:
        """On check steps (step % check_every == 0) record the current mask and return the largest distance between
        it and the other masks in the window; None on other steps or while the window is not full yet. Observing the
        same step twice (e.g. once per micro-batch) records it once and returns the same distance."""
        if step % self.config.check_every:
            return None
        if step == self.last_step:
            return self.last_distance
        newest = flatten_masks(*self.current_masks(model))
        if self.masks and self.masks[-1].shape != newest.shape:
            raise ValueError(f"the model's mask size changed from {self.masks[-1].numel()} to {newest.numel()} "
                             f"during the search")
        self.masks.append(newest)
        self.last_step = step
        if len(self.masks) < self.config.window:
            self.last_distance = None
        else:
            self.last_distance = max(hamming_distance(newest, other) for other in list(self.masks)[:-1])
        return self.last_distance

    @property
    def converged(self) -> bool:
        """The window is full and every mask in it is within epsilon of the newest."""
        return self.last_distance is not None and self.last_distance <= self.config.epsilon

    def should_draw(self, step: int) -> bool:
        """Whether to draw the ticket now. With `draw_at_step` set, that fixed step decides (distances are still
        computed for the logs); otherwise convergence does. `max_search_steps` caps the search in both cases."""
        config = self.config
        if self.drawn_step is not None:
            return False
        if config.draw_at_step is not None:
            if step >= config.draw_at_step:
                return True
        elif self.converged:
            return True
        return config.max_search_steps is not None and step >= config.max_search_steps

    def ticket(self, model: nn.Module) -> Ticket:
        """The ticket the current coefficients give (does not change the detector's state)."""
        return Ticket.from_masks(*self.current_masks(model))

    def draw(self, step: int, model: nn.Module) -> Ticket:
        """Draw the ticket and remember the step, so checkpoints record that the search is over."""
        self.drawn_ticket = self.ticket(model)
        self.drawn_step = int(step)
        return self.drawn_ticket

    @property
    def drawn(self) -> bool:
        return self.drawn_step is not None

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [m.clone() for m in self.masks], "last_distance": self.last_distance,
                "last_step": self.last_step, "drawn_step": self.drawn_step,
                "drawn_ticket": None if self.drawn_ticket is None else self.drawn_ticket.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved search. A window smaller than the saved one keeps the newest masks; a larger one waits
        until it is full again."""
        self.masks = deque((torch.as_tensor(m, dtype=torch.bool).clone() for m in state["masks"]),
                           maxlen=self.config.window)
        full = len(self.masks) == self.config.window
        self.last_distance = None if state.get("last_distance") is None or not full else float(state["last_distance"])
        self.last_step = None if state.get("last_step") is None else int(state["last_step"])
        self.drawn_step = None if state.get("drawn_step") is None else int(state["drawn_step"])
        ticket = state.get("drawn_ticket")
        self.drawn_ticket = None if ticket is None else Ticket.from_dict(ticket)
