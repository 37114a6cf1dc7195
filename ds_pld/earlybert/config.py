"""The `earlybert` config block, validated once into a typed object."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ds_pld.config_errors import ConfigError, boolean, check_keys, number

BLOCK = "earlybert"
MODES = ("layerwise", "global")


@dataclass(frozen=True)
class EarlyBertConfig:
    """Search (L1 on slimming coefficients), early-bird detection, then structured pruning.

    The ticket is drawn at `draw_at_step` when set (the original code's fixed step), else when the newest mask is
    within `epsilon` normalized Hamming distance of every other mask in the last `window` masks (computed every
    `check_every` steps), or at `max_search_steps` at the latest."""

    enabled: bool = True
    lambda_head: float = 1e-4
    lambda_ffn: float = 1e-4
    head_prune_ratio: float = 1.0 / 3.0
    ffn_prune_ratio: float = 0.4
    head_mode: str = "layerwise"
    ffn_mode: str = "global"
    check_every: int = 10
    window: int = 5
    epsilon: float = 0.1
    draw_at_step: int | None = None
    max_search_steps: int | None = None
    rewind: bool = False
    carry_optimizer_state: bool = True

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> EarlyBertConfig | None:
        if block is None:
            return None
        check_keys(block, BLOCK, allowed=cls.__dataclass_fields__)
        if not boolean(block, "enabled", BLOCK, default=True):
            return None
        d = cls()
        values: dict[str, Any] = {
            "lambda_head": number(block, "lambda_head", BLOCK, d.lambda_head, low=0.0),
            "lambda_ffn": number(block, "lambda_ffn", BLOCK, d.lambda_ffn, low=0.0),
            "head_prune_ratio": number(block, "head_prune_ratio", BLOCK, d.head_prune_ratio, low=0.0, high=1.0,
                                       high_open=True),
            "ffn_prune_ratio": number(block, "ffn_prune_ratio", BLOCK, d.ffn_prune_ratio, low=0.0, high=1.0,
                                      high_open=True),
            "check_every": number(block, "check_every", BLOCK, d.check_every, integer=True, low=1),
            "window": number(block, "window", BLOCK, d.window, integer=True, low=2),
            "epsilon": number(block, "epsilon", BLOCK, d.epsilon, low=0.0, low_open=True),
            "rewind": boolean(block, "rewind", BLOCK, d.rewind),
            "carry_optimizer_state": boolean(block, "carry_optimizer_state", BLOCK, d.carry_optimizer_state),
        }
        for key in ("head_mode", "ffn_mode"):
            mode = block.get(key, getattr(d, key))
            if mode not in MODES:
                raise ConfigError(f"'{BLOCK}.{key}' = {mode!r} must be one of {MODES}")
            values[key] = mode
        for key in ("draw_at_step", "max_search_steps"):
            if block.get(key) is not None:
                values[key] = number(block, key, BLOCK, integer=True, low=1)
        return cls(**values)
