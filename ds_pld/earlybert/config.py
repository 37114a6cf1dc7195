"""The `earlybert` config block, validated once into a typed object."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from ds_pld.config_errors import Bool, Float, Int, config_block, parse_block

BLOCK = "earlybert"
Mode = Literal["layerwise", "global"]
Ratio = Annotated[Float, Field(ge=0.0, lt=1.0)]
Step = Annotated[Int, Field(ge=1)]


@config_block
class EarlyBertConfig:
    """Search (L1 on slimming coefficients), early-bird detection, then structured pruning.

    The ticket is drawn at `draw_at_step` when set (the original code's fixed step), else when the newest mask is
    within `epsilon` normalized Hamming distance of every other mask in the last `window` masks (computed every
    `check_every` steps), or at `max_search_steps` at the latest."""

    enabled: Bool = True
    lambda_head: Annotated[Float, Field(ge=0.0)] = 1e-4
    lambda_ffn: Annotated[Float, Field(ge=0.0)] = 1e-4
    head_prune_ratio: Ratio = 1.0 / 3.0
    ffn_prune_ratio: Ratio = 0.4
    head_mode: Mode = "layerwise"
    ffn_mode: Mode = "global"
    check_every: Step = 10
    window: Annotated[Int, Field(ge=2)] = 5
    epsilon: Annotated[Float, Field(gt=0.0)] = 0.1
    draw_at_step: Step | None = None
    max_search_steps: Step | None = None
    rewind: Bool = False
    carry_optimizer_state: Bool = True

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, where: str = BLOCK) -> EarlyBertConfig | None:
        """None when the block is absent or says `"enabled": false`; `where` is the block's dotted path (GLUE
        fine-tuning nests it as 'glue.earlybert'), so errors name the key the user wrote."""
        if block is None:
            return None
        parsed = parse_block(cls, block, where)
        return parsed if parsed.enabled else None
