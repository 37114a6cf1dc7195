"""Row-wise LayerNorm forward and backward in Triton: one block covers a whole row (hidden sizes up to 16384).

The forward keeps each row's mean and 1/std (fp32, 8 bytes a row) for the backward instead of recomputing them.
The backward writes dx and reduces dweight/dbias over its rows in fp32 registers, one partial row per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_pld.kernels.triton_launch import (
    TILE_ELEMENTS,
    as_rows,
    block_cols,
    check_size,
    device_of,
    num_warps_for,
    require_launchable,
    split_rows,
)

MAX_COLS = 16384


@triton.jit
def _layer_norm_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, eps,
                               tiles_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        centered = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
        out = centered * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_backward_kernel(grad_out_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr,
                                grad_weight_partial_ptr, grad_bias_partial_ptr, n_rows, n_cols, tiles_per_program,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        grad_x_hat = grad_out * weight[None, :]
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight
        mean_grad = tl.sum(grad_x_hat, axis=1) / n_cols
        mean_grad_x_hat = tl.sum(grad_x_hat * x_hat, axis=1) / n_cols
        grad_x = (grad_x_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) * rstd[:, None]
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=ok)
        grad_weight += tl.sum(grad_out * x_hat, axis=0)
        grad_bias += tl.sum(grad_out, axis=0)
    partial = tl.program_id(0) * n_cols + cols
    tl.store(grad_weight_partial_ptr + partial, grad_weight, mask=col_ok)
    tl.store(grad_bias_partial_ptr + partial, grad_bias, mask=col_ok)


def _geometry(n_rows: int, n_cols: int) -> tuple[int, int, int, int, int]:
    """(row programs, tiles per program, BLOCK_M, BLOCK_N, num_warps): whole rows, several per tile when narrow."""
    block_n = block_cols(n_cols)
    block_m = max(1, TILE_ELEMENTS // block_n)
    row_programs, tiles_per_program = split_rows(n_rows, block_m)
    return row_programs, tiles_per_program, block_m, block_n, num_warps_for(block_m * block_n)


class LayerNorm(torch.autograd.Function):
    """F.layer_norm over the last dim with an elementwise affine; output in x's dtype, statistics in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n_cols = x.shape[-1]
        if weight.shape != (n_cols,) or bias.shape != (n_cols,):
            raise ValueError(f"LayerNorm weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match the "
                             f"last dim of x {tuple(x.shape)}")
        if n_cols > MAX_COLS:
            raise ValueError(f"hidden size {n_cols} exceeds the Triton LayerNorm's one-block rows ({MAX_COLS}); "
                             "use model.kernels='torch'")
        require_launchable(_layer_norm_forward_kernel, x, weight, bias)
        check_size(x)
        rows, weight, bias = as_rows(x), weight.contiguous(), bias.contiguous()
        out = torch.empty_like(rows)
        mean = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        row_programs, tiles_per_program, block_m, block_n, num_warps = _geometry(*rows.shape)
        if rows.numel():
            with device_of(rows):
                _layer_norm_forward_kernel[(row_programs,)](rows, weight, bias, out, mean, rstd, *rows.shape, eps,
                                                            tiles_per_program, BLOCK_M=block_m, BLOCK_N=block_n,
                                                            num_warps=num_warps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.x_shape, ctx.bias_dtype = x.shape, bias.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        rows, weight, mean, rstd = ctx.saved_tensors
        grad_rows = as_rows(grad_out)
        grad_x = torch.empty_like(rows)
        row_programs, tiles_per_program, block_m, block_n, num_warps = _geometry(*rows.shape)
        grad_weight_partial = torch.empty((row_programs, rows.shape[1]), dtype=torch.float32, device=rows.device)
        grad_bias_partial = torch.empty_like(grad_weight_partial)
        if not rows.numel():
            grad_weight_partial.zero_()
            grad_bias_partial.zero_()
        else:
            with device_of(rows):
                _layer_norm_backward_kernel[(row_programs,)](grad_rows, rows, weight, mean, rstd, grad_x,
                                                             grad_weight_partial, grad_bias_partial, *rows.shape,
                                                             tiles_per_program, BLOCK_M=block_m, BLOCK_N=block_n,
                                                             num_warps=num_warps)
        return (grad_x.view(ctx.x_shape), grad_weight_partial.sum(0).to(weight.dtype),
                grad_bias_partial.sum(0).to(ctx.bias_dtype), None)
