"""Progressive Layer Dropping as an algorithm, attached to a DeepSpeed engine through public hooks.

`attach(engine)` registers a forward pre-hook on the engine's module: in a training forward it starts the driver on
the engine's public step counter (`engine.global_steps`, the optimizer steps taken) and passes the draw to the model
as keywords (`progressive_layer_drop`, `pld_theta`, and `pld_seed` where the model takes it); in eval it passes
nothing, so every layer runs. No DeepSpeed method is overridden: the engine keeps its class. The schedule's state
travels in the checkpoint's `client_state` (ds_pld.plugin). A training loop that fires events also gets, at
STEP_END, the theta the step ran with and the expected number of layers it ran.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.config_errors import ConfigError
from ds_pld.pld import ProgressiveLayerDrop, expected_layers


def check_pld_model(model: nn.Module) -> bool:
    """Fail at attach, not mid-training, if the model cannot take PLD's keywords; return whether it takes
    `pld_seed` (our reproducible drop decisions)."""
    params = inspect.signature(model.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = {"progressive_layer_drop", "pld_theta"} - set(params)
    if missing and not accepts_any:
        raise ConfigError(f"progressive_layer_drop is enabled but {type(model).__name__}.forward does not accept "
                          f"the keyword argument(s) {sorted(missing)}; add them (see ds_pld.models.BertForPreTraining)")
    if getattr(getattr(model, "config", None), "layer_norm", None) == "post":
        from ds_pld.models.config import PLD_NEEDS_PRE_LN

        raise ConfigError(f"progressive_layer_drop is enabled but the model ({type(model).__name__}) is post-LN "
                          f"(config.layer_norm = \"post\"): {PLD_NEEDS_PRE_LN}")
    return "pld_seed" in params


class ProgressiveLayerDropping(Algorithm):
    """PLD on one engine at a time (EarlyBERT's draw moves it to the engine it swaps in). STEP_START: note the
    step's theta; STEP_END: `pld_theta` and `expected_layers` (the sum of the layers' keep probabilities)."""

    name = "pld"

    def __init__(self, driver: ProgressiveLayerDrop):
        self.driver = driver
        self.theta: float | None = None  # the theta of the step being computed
        self._engine: Any = None
        self._handle: RemovableHandle | None = None
        self._passes_seed = False

    def attach(self, engine: Any) -> None:
        """Drive `engine.module`'s training forwards (and no other engine's)."""
        self.detach()
        self._passes_seed = check_pld_model(engine.module)
        self._engine = engine
        self._handle = engine.module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.driver.start_step(engine.global_steps)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._engine = None, None

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not module.training:
            return None
        self.driver.start_step(self._engine.global_steps)
        draw = self.driver.draw()
        kwargs = {**kwargs, "progressive_layer_drop": True, "pld_theta": draw.theta}
        if self._passes_seed:
            kwargs["pld_seed"] = draw.seed
        return args, kwargs

    @property
    def current_theta(self) -> float:
        """Theta of the optimizer step the engine computes next."""
        step = self._engine.global_steps if self._engine is not None else self.driver.global_step
        return self.driver.theta_at(step)

    def set_theta(self, theta: float) -> None:
        """Theta for the step the engine computes next only (see ProgressiveLayerDrop.set_theta)."""
        if self._engine is not None:
            self.driver.start_step(self._engine.global_steps)
        self.driver.set_theta(theta)

    def restart_step(self) -> None:
        """After a checkpoint load: the engine's step counter moved, the micro-steps count from 0."""
        if self._engine is not None:
            self.driver.start_step(self._engine.global_steps)
        self.driver.restart_step()

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.STEP_START, Event.STEP_END)

    def apply(self, event: Event, state: State) -> Metrics | None:
        if event is Event.STEP_START:
            if self._engine is not state.engine:
                raise ConfigError("the PLD algorithm is not attached to the engine being trained: build the engine "
                                  "with ds_pld.initialize(..., pld=<this algorithm>) or call attach(engine)")
            self.theta = self.current_theta
            return None
        return {"pld_theta": self.theta, "expected_layers": expected_layers(self.theta, state.model.config.num_layers)}

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "global_step" in state:  # checkpoints of ds_pld <= issue 18 saved an empty state here
            self.driver.load_state_dict(state)
        self.restart_step()
