"""The `"optimizer": {"type": "Lamb", ...}` block, parsed into a LambConfig, and the Lamb built from it.

DeepSpeed 0.19.8 maps "Lamb" to FusedLamb (CUDA only) and does not list LAMB for ZeRO, so ds_pld.initialize removes
the block, builds our Lamb here and passes it to deepspeed.initialize as a client optimizer.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator
from torch import nn

from ds_pld.config_errors import Bool, ConfigError, Float, Str, config_block, parse_block, unknown_keys
from ds_pld.optim.lamb import Lamb
from ds_pld.optim.param_groups import lamb_param_groups

WHERE = "optimizer.params"
NonNegative = Annotated[Float, Field(ge=0.0)]
Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]


def _pair(value: Any) -> Any:
    """betas must be exactly two numbers; said up front rather than as pydantic's per-item 'missing' report."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError("must be two numbers in [0, 1)")
    return value


def _pattern_list(value: Any) -> Any:
    """A lone string would read as one pattern per character elsewhere: a list is required."""
    if isinstance(value, str):
        raise ValueError("must be a list of name patterns (strings)")
    return () if value is None else value


def _compiles(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"holds {pattern!r}, not a valid regular expression ({err})") from None
    return patterns


Patterns = Annotated[tuple[Str, ...], BeforeValidator(_pattern_list), AfterValidator(_compiles)]


@config_block
class LambConfig:
    """LAMB hyper-parameters; defaults are FusedLamb's. `exclude_from_weight_decay` / `exclude_from_trust_ratio` are
    regular expressions searched in parameter names (`"bias"`, `"norm"`); the trust-ratio list defaults to the
    weight-decay one, as in the original LAMB implementation."""

    lr: NonNegative = 1e-3
    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_pair)] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    bias_correction: Bool = True
    max_coeff: Annotated[Float, Field(gt=0.0)] = 10.0
    min_coeff: NonNegative = 0.01
    eps_inside_sqrt: Bool = False
    exclude_from_weight_decay: Patterns = ()
    exclude_from_trust_ratio: Patterns = ()

    @field_validator("min_coeff")
    @classmethod
    def _at_most_max_coeff(cls, value: float, info: ValidationInfo) -> float:
        top = info.data.get("max_coeff")
        if top is not None and value > top:
            raise ValueError(f"must be <= '{WHERE}.max_coeff' = {top}")
        return value

    @classmethod
    def from_optimizer_block(cls, block: Mapping[str, Any] | None) -> LambConfig | None:
        """None unless the block's type is Lamb (any case); otherwise every param is validated."""
        if block is None:
            return None
        if not isinstance(block, Mapping):
            raise ConfigError(f"'optimizer' must be a JSON object, got {type(block).__name__}")
        kind = block.get("type")
        if not isinstance(kind, str) or kind.lower() != "lamb":
            return None
        if set(block) - {"type", "params"}:
            raise ConfigError(unknown_keys(set(block) - {"type", "params"}, "optimizer", ("type", "params")))
        params = block.get("params", {})
        if isinstance(params, Mapping) and "max_grad_norm" in params:
            raise ConfigError(f"'{WHERE}.max_grad_norm' is not supported: use the top-level 'gradient_clipping', "
                              "which DeepSpeed applies before the optimizer step")
        parsed = parse_block(cls, params, WHERE)
        if params.get("exclude_from_trust_ratio") is None:  # default: the weight-decay list
            return replace(parsed, exclude_from_trust_ratio=parsed.exclude_from_weight_decay)
        return parsed

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """LAMB's parameter groups (ds_pld.optim.param_groups: the patterns, and no decay on slimming
        coefficients)."""
        return lamb_param_groups(model, self.weight_decay, self.exclude_from_weight_decay,
                                 self.exclude_from_trust_ratio)


def _zero_block(ds_config: Mapping[str, Any]) -> Mapping[str, Any]:
    zero = ds_config.get("zero_optimization", {})
    if isinstance(zero, bool):   # DeepSpeed's legacy form: true means stage 1
        return {"stage": 1 if zero else 0}
    return zero if isinstance(zero, Mapping) else {}


def build_lamb(cfg: LambConfig, model: nn.Module, ds_config: MutableMapping[str, Any]) -> Lamb:
    """Our Lamb over `model`'s parameters, after checking the ZeRO settings it supports; under ZeRO it sets
    `zero_allow_untested_optimizer` (and `zero_force_ds_cpu_optimizer: false` for CPU offload) in `ds_config`."""
    zero = _zero_block(ds_config)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"'zero_optimization.stage' = {stage!r}: Lamb supports ZeRO stages 0, 1, 2 and 3")
    offload = zero.get("offload_optimizer") or {}
    device = str(offload.get("device", "none")).lower() if isinstance(offload, Mapping) else "none"
    if zero.get("cpu_offload") is True:
        device = "cpu"
    if device == "nvme":
        raise ConfigError("'zero_optimization.offload_optimizer.device' = 'nvme' is not supported with Lamb "
                          "(DeepSpeed's NVMe optimizer swapper is untested with it); use 'cpu' or 'none'")
    if device == "cpu" and isinstance(offload, Mapping) and offload.get("ratio", 1.0) != 1.0:
        raise ConfigError("'zero_optimization.offload_optimizer.ratio' < 1 is not supported with Lamb: DeepSpeed "
                          "steps the on-accelerator part with a torch AdamW instead of the client optimizer")
    if device not in ("none", "cpu"):
        raise ConfigError(f"'zero_optimization.offload_optimizer.device' = {device!r}: use 'cpu' or 'none'")
    if stage > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    if device == "cpu":
        ds_config["zero_force_ds_cpu_optimizer"] = False
    groups = cfg.param_groups(model)
    if not groups:
        raise ConfigError("Lamb: the model has no trainable parameters")
    return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                bias_correction=cfg.bias_correction, max_coeff=cfg.max_coeff, min_coeff=cfg.min_coeff,
                eps_inside_sqrt=cfg.eps_inside_sqrt)
