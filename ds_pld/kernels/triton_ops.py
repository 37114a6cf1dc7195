"""The `triton` and `auto` kernel backends: the `TorchOps` interface backed by the fused Triton kernels.

Importing this module imports triton; `build_ops` catches the ImportError where triton is missing. Whether the
kernels are interpreted is fixed when this module is first imported: with TRITON_INTERPRET=1 set by then,
`TritonOps` runs on CPU tensors (slowly; that is how the tests run without a GPU).
"""
from __future__ import annotations

import torch

from ds_pld.kernels.reference import TorchOps
from ds_pld.kernels.triton_bias_ops import BiasDropoutResidual, BiasGelu
from ds_pld.kernels.triton_layer_norm import LayerNorm


class TritonOps:
    """Always the Triton kernels (CUDA tensors, or any tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    def bias_gelu(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """GELU(x + bias), exact (erf) GELU as in BERT."""
        return BiasGelu.apply(x, bias)

    def bias_dropout_residual(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                              scale: float, training: bool) -> torch.Tensor:
        """residual + scale * dropout(x + bias); scale is PLD's 1/p_l for a kept layer (1 otherwise)."""
        return BiasDropoutResidual.apply(x, bias, residual, float(p) if training else 0.0, float(scale))

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return LayerNorm.apply(x, weight, bias, float(eps))


class AutoOps:
    """Triton kernels for CUDA tensors, the torch reference for anything else (CPU runs, tests, other devices).

    The choice is made per call from the input's device, so one model object works on both."""

    name = "auto"

    def __init__(self) -> None:
        self._triton = TritonOps()
        self._torch = TorchOps()

    def _pick(self, x: torch.Tensor) -> TritonOps | TorchOps:
        return self._triton if x.is_cuda else self._torch

    def bias_gelu(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self._pick(x).bias_gelu(x, bias)

    def bias_dropout_residual(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                              scale: float, training: bool) -> torch.Tensor:
        return self._pick(x).bias_dropout_residual(x, bias, residual, p, scale, training)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return self._pick(x).layer_norm(x, weight, bias, eps)
