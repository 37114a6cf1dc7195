"""Plain PyTorch versions of the pre-LN layer's elementwise paths: the CPU path and the kernels' test reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    """Unfused ops; every backend implements exactly these signatures."""

    name = "torch"

    def bias_gelu(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """GELU(x + bias), exact (erf) GELU as in BERT."""
        return F.gelu(x + bias)

    def bias_dropout_residual(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                              scale: float, training: bool) -> torch.Tensor:
        """residual + scale * dropout(x + bias); scale is PLD's 1/p_l for a kept layer (1 otherwise)."""
        out = F.dropout(x + bias, p, training)
        return residual + out * scale if scale != 1.0 else residual + out

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
