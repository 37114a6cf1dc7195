"""Random-LTD as an algorithm: DeepSpeed's engine schedules it, ds_pld drops the tokens.

DeepSpeed's engine builds a `RandomLTDScheduler` from the config's `data_efficiency.data_routing.random_ltd` block
(`engine.random_ltd_scheduler`), advances it at the start of every training forward (`update_seq(global_steps)`)
and saves and loads its state with each checkpoint. `attach(engine)` adds a forward pre-hook on the engine's module
that passes the scheduler's current kept length to the model (`random_ltd=TokenDrop(keep, layers)`); the model
(ds_pld.models.bert) gathers those tokens around each dropping layer (ds_pld.random_ltd). In eval nothing is passed:
every token runs every layer. DeepSpeed's own path (`convert_to_random_ltd`) wraps each layer in a module with a
CUDA-only sort and gather and renames the layers' state-dict keys; this one keeps the model's keys and runs anywhere.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.config_errors import ConfigError
from ds_pld.random_ltd import RANDOM_LTD_KEY, RandomLTDConfig, TokenDrop


def check_random_ltd_model(model: nn.Module, config: RandomLTDConfig) -> None:
    """Fail at attach, not mid-training, if the model cannot take `random_ltd` or does not fit the block."""
    params = inspect.signature(model.forward).parameters
    if "random_ltd" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"'{RANDOM_LTD_KEY}' is enabled but {type(model).__name__}.forward does not accept the "
                          "keyword argument 'random_ltd' (see ds_pld.models.BertForPreTraining)")
    num_layers = getattr(getattr(model, "config", None), "num_layers", None)
    if num_layers is not None:
        config.check_model(num_layers)


class RandomTokenDropping(Algorithm):
    """Random-LTD on one engine at a time. STEP_END: `ltd_tokens` (tokens each dropping layer kept this step) and
    `ltd_layer_tokens` (DeepSpeed's count of layer-tokens consumed so far)."""

    name = "random_ltd"

    def __init__(self, config: RandomLTDConfig):
        self.config = config
        self.tokens_used: int | None = None  # the kept length of the last training forward
        self._override: int | None = None
        self._engine: Any = None
        self._handle: RemovableHandle | None = None

    def attach(self, engine: Any) -> None:
        self.detach()
        if not engine.random_ltd_enabled():
            raise ConfigError(f"random-LTD was asked for but the engine's config has no enabled '{RANDOM_LTD_KEY}'")
        check_random_ltd_model(engine.module, self.config)
        self._engine = engine
        self._handle = engine.module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._engine = None, None

    def set_tokens(self, keep: int | None) -> None:
        """Keep `keep` tokens from now on instead of DeepSpeed's schedule (None: back to it). For a loop that
        schedules by another clock, as the time-to-quality study drives PLD's theta by the budget spent."""
        self._override = keep

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not module.training:
            return None
        # DeepSpeed advanced its scheduler at the start of this forward (engine.forward, before the module's hooks).
        keep = self._override if self._override is not None else self._engine.random_ltd_scheduler.get_current_seq()
        self.tokens_used = int(keep)
        return args, {**kwargs, "random_ltd": TokenDrop(self.tokens_used, self.config.layers)}

    def match(self, event: Event, state: State) -> bool:
        return event is Event.STEP_END

    def apply(self, event: Event, state: State) -> Metrics | None:
        consumed = state.engine.random_ltd_scheduler.state_dict()["consumed_layer_tokens"]
        return {"ltd_tokens": self.tokens_used, "ltd_layer_tokens": int(consumed)}

