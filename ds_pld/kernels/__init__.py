"""Kernel backends for the pre-LN layer's elementwise paths: `torch` (reference, any device), `triton` (fused GPU
kernels) and `auto` (Triton on CUDA tensors when Triton is installed, torch otherwise)."""
from __future__ import annotations

from ds_pld.config_errors import ConfigError
from ds_pld.kernels.reference import TorchOps

BACKENDS = ("auto", "triton", "torch")


def build_ops(backend: str = "auto"):
    """Return an ops object with `bias_gelu`, `bias_dropout_residual` and `layer_norm`."""
    if backend not in BACKENDS:
        raise ConfigError(f"'model.kernels' = {backend!r} must be one of {BACKENDS}")
    if backend == "torch":
        return TorchOps()
    try:
        from ds_pld.kernels.triton_ops import AutoOps, TritonOps
    except ImportError as err:
        if backend == "triton":
            raise ConfigError(f"'model.kernels' = 'triton' but the Triton kernels cannot be imported: {err}") from err
        return TorchOps()
    return TritonOps() if backend == "triton" else AutoOps()
