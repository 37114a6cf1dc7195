"""What ZeRO-3 fetches as one unit when PLD drops layers (issue 14).

ZeRO-3 prefetches along a trace: the order of modules whose hooks ran in the previous forward and backward. PLD runs a
different set of layers in every pass, so with the layers in the trace it is invalidated every step; those passes run
without prefetching and release each layer's weights after its forward, to gather them again for its backward. With
the whole encoder one ZeRO-3 leaf the module order is the same in every pass: the trace stays valid and every
parameter is gathered once per pass. The price: dropped layers are gathered too (they still neither compute nor get
a gradient from the loss), stay gathered from the forward to the backward as every layer does under ZeRO-3 without
PLD, and DeepSpeed reduces a zero gradient for them (its leaf hook fills missing gradients with zeros, which is what
stages 0-2 apply to dropped layers anyway). Measured in docs/benchmarks.md ("ZeRO-3 under PLD").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepspeed.utils import set_z3_leaf_module, z3_leaf_module
from torch import nn

from ds_pld.config_errors import ConfigError
from ds_pld.models.bert import BertEncoder

DEFAULT_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default


def max_live_parameters(zero: Mapping[str, Any]) -> int:
    """The `zero_optimization` block's bound on gathered parameters (DeepSpeed accepts both spellings)."""
    value = zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", DEFAULT_MAX_LIVE_PARAMETERS))
    return int(float(value))


def prepare_zero3_pld(model: nn.Module, ds_config: Mapping[str, Any], pld_enabled: bool) -> list[nn.Module]:
    """Under ZeRO-3 with PLD, make every BertEncoder of `model` one ZeRO-3 leaf, the only layout in which PLD trains
    right under ZeRO-3 (a dropped layer then gets the zero gradient stages 0-2 give it, instead of keeping its last
    gradient partition); return the encoders marked. Nothing is marked without PLD or below stage 3. Refused, naming
    the key, for an encoder larger than `stage3_max_live_parameters` (a leaf is gathered whole) and for a model
    without a BertEncoder. Must run before `deepspeed.initialize`: DeepSpeed reads the flags when it installs its
    hooks."""
    zero = ds_config.get("zero_optimization") or {}
    if not pld_enabled or zero.get("stage") != 3:
        return []
    encoders = _encoders(model)
    limit = max_live_parameters(zero)
    for encoder in encoders:
        size = sum(p.numel() for p in encoder.parameters())
        if size > limit:
            raise ConfigError(f"progressive_layer_drop under ZeRO-3 gathers the encoder as one unit ({size:,} "
                              f"parameters), more than 'zero_optimization.stage3_max_live_parameters' = {limit:,}: "
                              f"raise that bound to at least {size:,}, or use ZeRO stage 1-2")
    for encoder in encoders:
        set_z3_leaf_module(encoder, True)
    return encoders


def _encoders(model: nn.Module) -> list[nn.Module]:
    encoders = [module for module in model.modules() if isinstance(module, BertEncoder)]
    if not encoders:
        raise ConfigError(f"progressive_layer_drop under ZeRO-3 is supported for ds_pld.models' BertEncoder only, "
                          f"which it makes one ZeRO-3 leaf; {type(model).__name__} has none: use ZeRO stage 0-2 "
                          "('zero_optimization.stage')")
    return encoders


def check_zero3_pld(model: nn.Module) -> None:
    """For an engine built elsewhere (`ds_pld.attach`): every BertEncoder must already be a ZeRO-3 leaf."""
    if not all(z3_leaf_module(encoder) for encoder in _encoders(model)):
        raise ConfigError("progressive_layer_drop under ZeRO-3 needs the encoder to be one ZeRO-3 leaf before "
                          "DeepSpeed installs its hooks: call ds_pld.models.zero3.prepare_zero3_pld(model, config, "
                          "True) before deepspeed.initialize, or build the engine with ds_pld.initialize")
