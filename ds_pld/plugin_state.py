"""What ds_pld keeps beside one DeepSpeed engine: its parsed config, the PLD algorithm driving it, the objects whose
state travels in its checkpoints, the checkpoint metadata, and the ZeRO-0 gradient norm.

The engine stays DeepSpeed's own class; `plugin_of(engine)` finds this object (kept as one attribute of ds_pld's on
the engine instance). Nothing here overrides or patches a DeepSpeed method.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ds_pld.config import DsPldConfig
from ds_pld.config_errors import ConfigError

PLUGIN_ATTR = "ds_pld_plugin"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _plain_fp32_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer DeepSpeed steps directly (ZeRO-0, fp32), whose gradient norm DeepSpeed does not keep."""
    if engine.zero_optimization_stage() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    return engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else None


class DsPld:
    """ds_pld's state for one engine. `extra_state`: name -> object with state_dict/load_state_dict, saved in the
    checkpoint's client_state; `checkpoint_meta`: extra keys for the checkpoint's metadata file."""

    def __init__(self, engine: Any, config: DsPldConfig, pld: Any = None, random_ltd: Any = None):
        self.engine = engine
        self.config = config
        self.pld = pld  # ds_pld.algorithms.ProgressiveLayerDropping, attached to engine, or None
        self.random_ltd = random_ltd  # ds_pld.algorithms.random_ltd.RandomTokenDropping, attached, or None
        self.extra_state: dict[str, Stateful] = {} if pld is None else {pld.name: pld}
        self.checkpoint_meta: dict[str, Any] = {}
        self._zero0_grad_norm: torch.Tensor | None = None
        self.workaround_handles: list[Any] = []  # ds_pld.compat.apply_workarounds
        optimizer = _plain_fp32_optimizer(engine)
        self._norm_hook = None if optimizer is None else optimizer.register_step_pre_hook(self._keep_grad_norm)

    def _keep_grad_norm(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """ZeRO-0 in fp32: DeepSpeed computes no norm it keeps (only when clipping, and then drops it), so take the
        norm of the gradients the optimizer is about to apply (after any clipping: a non-finite norm stays
        non-finite). A device tensor: no host sync."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._zero0_grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None

    def global_grad_norm(self) -> torch.Tensor | float | None:
        """The norm of the last optimizer step's gradients: DeepSpeed's `get_global_grad_norm()` (ZeRO 1-3, bf16,
        fp16), or at ZeRO-0 in fp32 the one this plugin takes before the optimizer step."""
        norm = self.engine.get_global_grad_norm()
        return self._zero0_grad_norm if norm is None else norm

    def pld_theta(self) -> float | None:
        """Theta of the optimizer step the engine computes next, or None without PLD."""
        return None if self.pld is None else self.pld.current_theta

    def detach(self) -> None:
        for handle in self.workaround_handles:
            handle.remove()
        self.workaround_handles = []
        if self._norm_hook is not None:
            self._norm_hook.remove()
            self._norm_hook = None
        for algorithm in (self.pld, self.random_ltd):
            if algorithm is not None:
                algorithm.detach()


def plugin_of(engine: Any) -> DsPld:
    """The ds_pld state of an engine built by `ds_pld.initialize` (or given `ds_pld.attach`)."""
    plugin = getattr(engine, PLUGIN_ATTR, None)
    if not isinstance(plugin, DsPld):
        raise ConfigError(f"this {type(engine).__name__} has no ds_pld plugin: build it with ds_pld.initialize or "
                          "call ds_pld.attach(engine, config)")
    return plugin


def continue_progress(engine: Any, global_steps: int, global_samples: int) -> None:
    """Continue the step and sample counts of an engine this one replaces (EarlyBERT rebuilds the engine mid-run),
    so the learning-rate schedule, PLD and the checkpoints go on from there. DeepSpeed has no public setter: these are
    the engine's own public counters, written (docs/architecture.md, private-field table)."""
    for name in ("global_steps", "global_samples"):
        if not isinstance(getattr(engine, name, None), int):
            raise ConfigError(f"DeepSpeed's engine has no integer `{name}` counter to continue an EarlyBERT-rebuilt "
                              "engine from (ds_pld was written against DeepSpeed 0.17-0.19)")
    engine.global_steps, engine.global_samples = int(global_steps), int(global_samples)
    plugin = getattr(engine, PLUGIN_ATTR, None)
    if isinstance(plugin, DsPld) and plugin.pld is not None:
        plugin.pld.restart_step()
