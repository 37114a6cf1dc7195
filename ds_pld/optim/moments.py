"""What the optimizer holds, as full fp32 CPU tensors by parameter name: the weights' masters and Adam's moments.

The masters are what a model rebuilt mid-run (EarlyBERT's draw) or exported (final/) must start from: under mixed
precision the module holds only a rounded copy, under ZeRO-3 only a shard.

Moments: EarlyBERT's draw rebuilds the engine around a smaller model; without them the new optimizer starts with
empty moments (and a bias correction that restarts at step 1) in the middle of the run. Reading works with a plain
torch optimizer (ZeRO-0, fp32) holding per-parameter state. DeepSpeed's partitioned optimizers (ZeRO 1-3, bf16)
keep flat fp32 partitions whose state a fresh engine creates only at its first step, so there both functions
decline (None / False) and the slim model's moments start empty, as before. Frozen parameters have no moments and
are left out.
"""
from __future__ import annotations

from collections.abc import Mapping

import deepspeed
import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def _partitioned(engine) -> bool:
    """DeepSpeed keeps the fp32 state away from the parameters (ZeRO 1-3, or a bf16/fp16 optimizer wrapper)."""
    return bool(engine.zero_optimization_stage()) or engine.bfloat16_enabled() or engine.fp16_enabled()


def fp32_value(param: torch.nn.Parameter) -> torch.Tensor:
    """The value the optimizer holds: the fp32 master under DeepSpeed mixed precision / ZeRO (DeepSpeed's public
    `safe_get_full_fp32_param`, None for a parameter it holds no master for), else the parameter itself (frozen
    parameters have no master). Detached, fp32, on the CPU. A collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param) if param.requires_grad else None
    return (param if master is None else master).detach().float().cpu()


def full_precision_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole and in fp32 (`fp32_value`), by name. A collective under ZeRO: call it on every rank."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op for parameters ZeRO-3 does not shard
        return {name: fp32_value(param).clone() for name, param in params.items()}


def _trained(engine) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in engine.module.named_parameters() if param.requires_grad}


def read_moments(engine) -> dict[str, dict[str, torch.Tensor]] | None:
    """{name: {"exp_avg": ..., "exp_avg_sq": ...}} on the CPU, or None when the optimizer partitions its state or
    keeps no such state for some parameter (not an Adam-type optimizer, or no step taken yet)."""
    params = _trained(engine)
    if _partitioned(engine) or not hasattr(engine.optimizer, "state"):
        return None
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in params.items():
        state = engine.optimizer.state.get(param, {})
        if any(state.get(key) is None for key in MOMENT_KEYS):
            return None
        moments[name] = {key: state[key].detach().float().cpu().clone() for key in MOMENT_KEYS}
    return moments


def write_moments(engine, moments: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> bool:
    """Load `moments` (every trained parameter of `engine.module` by name) and set Adam's step count to `step`, so
    its bias correction continues instead of restarting. False (nothing written) where the optimizer partitions its
    state."""
    params = _trained(engine)
    missing = sorted(set(params) - set(moments))
    if missing:
        raise KeyError(f"no moments for parameters {missing[:5]}")
    if _partitioned(engine) or not hasattr(engine.optimizer, "state"):
        return False
    for name, param in params.items():
        engine.optimizer.state[param] = {
            "step": torch.tensor(float(step)),
            **{key: moments[name][key].to(device=param.device, dtype=param.dtype).clone() for key in MOMENT_KEYS}}
    return True
