"""Adam's moments as full fp32 tensors by parameter name, read from and written into a DeepSpeed engine.

EarlyBERT's draw rebuilds the engine around a smaller model; without this the new optimizer starts with empty
moments (and a bias correction that restarts at step 1) in the middle of the run. Reading works with a plain
torch optimizer (ZeRO-0, fp32) holding per-parameter state. DeepSpeed's partitioned optimizers (ZeRO 1-3, bf16)
keep flat fp32 partitions whose state a fresh engine creates only at its first step, so there both functions
decline (None / False) and the slim model's moments start empty, as before.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def _partitioned(param: torch.nn.Parameter) -> bool:
    """DeepSpeed keeps this parameter's fp32 state elsewhere (ZeRO-3 `ds_id`, ZeRO-1/2 and bf16 `_hp_mapping`)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def read_moments(engine) -> dict[str, dict[str, torch.Tensor]] | None:
    """{name: {"exp_avg": ..., "exp_avg_sq": ...}} on the CPU, or None when the optimizer partitions its state or
    keeps no such state for some parameter (not an Adam-type optimizer, or no step taken yet)."""
    params = dict(engine.module.named_parameters())
    if any(_partitioned(param) for param in params.values()) or not hasattr(engine.optimizer, "state"):
        return None
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in params.items():
        state = engine.optimizer.state.get(param, {})
        if any(state.get(key) is None for key in MOMENT_KEYS):
            return None
        moments[name] = {key: state[key].detach().float().cpu().clone() for key in MOMENT_KEYS}
    return moments


def write_moments(engine, moments: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> bool:
    """Load `moments` (every parameter of `engine.module` by name) and set Adam's step count to `step`, so its bias
    correction continues instead of restarting. False (nothing written) where the optimizer partitions its state."""
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(moments))
    if missing:
        raise KeyError(f"no moments for parameters {missing[:5]}")
    if any(_partitioned(param) for param in params.values()) or not hasattr(engine.optimizer, "state"):
        return False
    for name, param in params.items():
        engine.optimizer.state[param] = {
            "step": torch.tensor(float(step)),
            **{key: moments[name][key].to(device=param.device, dtype=param.dtype).clone() for key in MOMENT_KEYS}}
    return True
