"""Finding the slimming coefficients in a model and reading their values (fp32 masters under DeepSpeed)."""
from __future__ import annotations

import torch
from torch import nn

from ds_pld.config_errors import ConfigError
from ds_pld.models.bert import PreLNLayer
from ds_pld.optim.moments import fp32_value


def slimming_layers(model: nn.Module) -> list[PreLNLayer]:
    """The layers that carry slimming coefficients, in depth order. Found through `model.modules()` (registration
    order, which is depth order for the encoder's ModuleList), so any wrapper around the encoder works."""
    return [m for m in model.modules() if isinstance(m, PreLNLayer) and m.head_coef is not None]


def require_slimming_layers(model: nn.Module) -> list[PreLNLayer]:
    """`slimming_layers`, failing with a clear message when the model was built without coefficients."""
    layers = slimming_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no EarlyBERT slimming coefficients; build it with "
                          f"'model.slimming' = true")
    return layers


def check_materialized(param: nn.Parameter, name: str) -> None:
    """ZeRO-3 keeps only a shard of a partitioned parameter outside the forward; the coefficients are read outside
    it, so they must stay whole. They are tiny, hence persistent under the default persistence threshold, but ZeRO-3
    still releases persistent parameters after the first (trace-recording) forward: gather them back (a collective,
    like every call here under DeepSpeed)."""
    if param.numel() == 0 and getattr(param, "ds_numel", 0) > 0 and getattr(param, "ds_persist", False):
        param.all_gather()
    if param.numel() == 0 and getattr(param, "ds_numel", 0) > 0:
        raise ConfigError(f"the EarlyBERT coefficient {name} is partitioned by ZeRO-3; keep it whole with "
                          f"'zero_optimization.stage3_param_persistence_threshold' >= {param.ds_numel}")


def coefficient_values(param: nn.Parameter, name: str = "coefficient") -> torch.Tensor:
    """The value the optimizer holds: the fp32 master under DeepSpeed mixed precision / ZeRO (bf16 copies are too
    coarse to rank coefficients that move by ~lr per step), else the parameter itself. Detached, fp32, on the CPU.
    Under DeepSpeed this is a collective: call it on every rank."""
    check_materialized(param, name)
    return fp32_value(param)


def read_coefficients(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head coefficients per layer, FFN coefficients per layer) as fp32 CPU tensors."""
    layers = require_slimming_layers(model)
    heads = [coefficient_values(layer.head_coef, f"layer {i} head_coef") for i, layer in enumerate(layers)]
    ffn = [coefficient_values(layer.ffn_coef, f"layer {i} ffn_coef") for i, layer in enumerate(layers)]
    return heads, ffn
