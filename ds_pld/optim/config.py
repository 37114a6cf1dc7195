"""The `"optimizer": {"type": "Lamb", ...}` block, parsed into a LambConfig, and the Lamb built from it.

DeepSpeed 0.19.8 maps "Lamb" to FusedLamb (CUDA only) and does not list LAMB for ZeRO, so ds_pld.initialize removes
the block, builds our Lamb here and passes it to deepspeed.initialize as a client optimizer.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ds_pld.config_errors import ConfigError, boolean, check_keys, number
from ds_pld.optim.lamb import Lamb

WHERE = "optimizer.params"
PARAM_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff", "eps_inside_sqrt",
              "exclude_from_weight_decay", "exclude_from_trust_ratio")


def _patterns(params: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"'{WHERE}.{key}' must be a list of name patterns (strings), got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"'{WHERE}.{key}': {pattern!r} is not a valid regular expression ({err})") from None
    return tuple(value)


@dataclass(frozen=True)
class LambConfig:
    """LAMB hyper-parameters; defaults are FusedLamb's. `exclude_from_weight_decay` / `exclude_from_trust_ratio` are
    regular expressions searched in parameter names (`"bias"`, `"norm"`); the trust-ratio list defaults to the
    weight-decay one, as in the original LAMB implementation."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    bias_correction: bool = True
    max_coeff: float = 10.0
    min_coeff: float = 0.01
    eps_inside_sqrt: bool = False
    exclude_from_weight_decay: tuple[str, ...] = ()
    exclude_from_trust_ratio: tuple[str, ...] = ()

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
        check_keys(block, "optimizer", ("type", "params"))
        params = block.get("params", {})
        if isinstance(params, Mapping) and "max_grad_norm" in params:
            raise ConfigError(f"'{WHERE}.max_grad_norm' is not supported: use the top-level 'gradient_clipping', "
                              "which DeepSpeed applies before the optimizer step")
        check_keys(params, WHERE, PARAM_KEYS)
        betas = params.get("betas", cls.betas)
        if (isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"'{WHERE}.betas' must be two numbers in [0, 1), got {betas!r}")
        max_coeff = number(params, "max_coeff", WHERE, cls.max_coeff, low=0.0, low_open=True)
        min_coeff = number(params, "min_coeff", WHERE, cls.min_coeff, low=0.0)
        if min_coeff > max_coeff:
            raise ConfigError(f"'{WHERE}.min_coeff' = {min_coeff} must be <= '{WHERE}.max_coeff' = {max_coeff}")
        no_decay = _patterns(params, "exclude_from_weight_decay") or ()
        no_trust = _patterns(params, "exclude_from_trust_ratio")
        return cls(lr=number(params, "lr", WHERE, cls.lr, low=0.0),
                   betas=(float(betas[0]), float(betas[1])),
                   eps=number(params, "eps", WHERE, cls.eps, low=0.0),
                   weight_decay=number(params, "weight_decay", WHERE, cls.weight_decay, low=0.0),
                   bias_correction=boolean(params, "bias_correction", WHERE, cls.bias_correction),
                   max_coeff=max_coeff, min_coeff=min_coeff,
                   eps_inside_sqrt=boolean(params, "eps_inside_sqrt", WHERE, cls.eps_inside_sqrt),
                   exclude_from_weight_decay=no_decay,
                   exclude_from_trust_ratio=no_decay if no_trust is None else no_trust)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters split by the exclusion patterns into at most four groups (decay x trust ratio);
        empty groups are dropped. Under ZeRO-1/2 each group with trust ratio on costs one small all-reduce."""
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            decay = not any(re.search(p, name) for p in self.exclude_from_weight_decay)
            trust = not any(re.search(p, name) for p in self.exclude_from_trust_ratio)
            buckets.setdefault((decay, trust), []).append(param)
        return [dict(params=params, weight_decay=self.weight_decay if decay else 0.0, trust_ratio=trust)
                for (decay, trust), params in sorted(buckets.items(), reverse=True)]


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
