"""Which parameters get weight decay: one rule, named here, for every optimizer and trainer.

BERT's recipe exempts biases and normalization weights; EarlyBERT's slimming coefficients are exempt too, because
their own L1 penalty is what drives them (weight decay on top would shrink heads the search has not judged). LAMB
keeps its configurable pattern lists (`exclude_from_weight_decay`, as in the original LAMB code), but a slimming
coefficient is exempt whatever the patterns say.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

SLIMMING_SUFFIX = "_coef"  # PreLNLayer.head_coef / ffn_coef


def is_slimming_coefficient(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith(SLIMMING_SUFFIX)


def no_weight_decay(name: str) -> bool:
    """Biases, normalization weights (any module whose name has "norm") and slimming coefficients."""
    *modules, leaf = name.split(".")
    return leaf == "bias" or is_slimming_coefficient(name) or any("norm" in module.lower() for module in modules)


def weight_decay_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """[decayed, exempt] trainable parameters. The decayed group takes `weight_decay` when given, else the
    optimizer's own setting; the exempt group has 0."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if no_weight_decay(name) else decay).append(param)
    first: dict[str, Any] = {"params": decay} if weight_decay is None else {"params": decay,
                                                                             "weight_decay": weight_decay}
    return [first, {"params": exempt, "weight_decay": 0.0}]


def lamb_param_groups(model: nn.Module, weight_decay: float, exclude_from_weight_decay: Sequence[str],
                      exclude_from_trust_ratio: Sequence[str]) -> list[dict[str, Any]]:
    """Trainable parameters split by LAMB's regular expressions into at most four groups (decay x trust ratio);
    empty groups are dropped, slimming coefficients never decay. Under ZeRO-1/2 each group with trust ratio on
    costs one small all-reduce."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (is_slimming_coefficient(name) or any(re.search(p, name) for p in exclude_from_weight_decay))
        trust = not any(re.search(p, name) for p in exclude_from_trust_ratio)
        buckets.setdefault((decay, trust), []).append(param)
    return [dict(params=params, weight_decay=weight_decay if decay else 0.0, trust_ratio=trust)
            for (decay, trust), params in sorted(buckets.items(), reverse=True)]
