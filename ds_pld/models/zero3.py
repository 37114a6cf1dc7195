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

from deepspeed.utils import set_z3_leaf_module
from torch import nn

from ds_pld.models.bert import BertEncoder

DEFAULT_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default


def max_live_parameters(zero: Mapping[str, Any]) -> int:
    """The `zero_optimization` block's bound on gathered parameters (DeepSpeed accepts both spellings)."""
    value = zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", DEFAULT_MAX_LIVE_PARAMETERS))
    return int(float(value))


def prepare_zero3_pld(model: nn.Module, ds_config: Mapping[str, Any], pld_enabled: bool) -> list[nn.Module]:
    """Under ZeRO-3 with PLD, make every BertEncoder of `model` one ZeRO-3 leaf, so PLD's drops keep ZeRO-3's trace
    valid; return the encoders marked. Skipped (nothing marked) without PLD, below stage 3, for models without a
    BertEncoder, and for an encoder larger than `stage3_max_live_parameters`, whose bound a leaf would break (it is
    gathered whole). Must run before `deepspeed.initialize`: DeepSpeed reads the flags when it installs its hooks."""
    zero = ds_config.get("zero_optimization") or {}
    if not pld_enabled or zero.get("stage") != 3:
        return []
    limit = max_live_parameters(zero)
    marked = []
    for module in model.modules():
        if isinstance(module, BertEncoder) and sum(p.numel() for p in module.parameters()) <= limit:
            set_z3_leaf_module(module, True)
            marked.append(module)
    return marked
