"""Fused Triton kernels for the pre-LN layer's bias epilogues: bias+GELU and bias+dropout+residual add.

Each saves one read and one write of the activation per op compared with the unfused torch ops, and the backward
kernels also reduce the bias gradient (fp32, per program) while they write the input gradient. All arithmetic is
fp32 whatever the storage dtype (bf16 inputs are upcast on load and rounded once on store). Output dtypes follow
torch's type promotion of the inputs, so the ops behave exactly like `TorchOps` under autocast too.
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
    require_launchable,
    split_rows,
)

SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
MAX_BLOCK_N = 256


@triton.jit
def _bias_gelu_forward_kernel(x_ptr, bias_ptr, out_ptr, n_rows, n_cols, tiles_per_program,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < n_rows) & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        z = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        out = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_backward_kernel(grad_out_ptr, x_ptr, bias_ptr, grad_x_ptr, grad_bias_partial_ptr, n_rows, n_cols,
                               tiles_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < n_rows) & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        z = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        grad_out = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        grad_z = tl.where(ok, grad_out * (cdf + z * pdf), 0.0)
        tl.store(grad_x_ptr + offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=ok)
        grad_bias += tl.sum(grad_z, axis=0)
    tl.store(grad_bias_partial_ptr + tl.program_id(0) * n_cols + cols, grad_bias, mask=col_ok)


@triton.jit
def _bias_dropout_residual_forward_kernel(x_ptr, bias_ptr, residual_ptr, out_ptr, seed_ptr, p, multiplier, n_rows,
                                          n_cols, tiles_per_program, HAS_DROPOUT: tl.constexpr,
                                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < n_rows) & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        z = (tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + bias[None, :]) * multiplier
        if HAS_DROPOUT:
            # The Philox counter is the element's flat index: the backward regenerates the same mask.
            z = tl.where(tl.rand(seed, offsets) >= p, z, 0.0)
        out = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + z
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_dropout_residual_backward_kernel(grad_out_ptr, grad_x_ptr, grad_bias_partial_ptr, seed_ptr, p, multiplier,
                                           n_rows, n_cols, tiles_per_program, HAS_DROPOUT: tl.constexpr,
                                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < n_rows) & col_ok[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        grad_z = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32) * multiplier
        if HAS_DROPOUT:
            grad_z = tl.where(tl.rand(seed, offsets) >= p, grad_z, 0.0)
        tl.store(grad_x_ptr + offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=ok)
        grad_bias += tl.sum(grad_z, axis=0)
    tl.store(grad_bias_partial_ptr + tl.program_id(0) * n_cols + cols, grad_bias, mask=col_ok)


def _tiles(n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a column block of up to 256 and as many rows as fit in TILE_ELEMENTS."""
    block_n = block_cols(n_cols, MAX_BLOCK_N)
    return max(1, TILE_ELEMENTS // block_n), block_n


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    block_m, block_n = _tiles(n_cols)
    row_programs, tiles_per_program = split_rows(n_rows, block_m)
    return (row_programs, triton.cdiv(n_cols, block_n)), tiles_per_program, block_m, block_n


def _check_bias(x: torch.Tensor, bias: torch.Tensor) -> None:
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match the last dim of x {tuple(x.shape)}")


class BiasGelu(torch.autograd.Function):
    """GELU(x + bias), exact erf GELU. Saves x and bias (the same memory torch's x + bias would keep)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        _check_bias(x, bias)
        require_launchable(_bias_gelu_forward_kernel, x, bias)
        check_size(x)
        rows = as_rows(x)
        bias = bias.contiguous()
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, bias.dtype), device=x.device)
        if rows.numel():
            grid, tiles_per_program, block_m, block_n = _grid(*rows.shape)
            with device_of(rows):
                _bias_gelu_forward_kernel[grid](rows, bias, out, *rows.shape, tiles_per_program,
                                                BLOCK_M=block_m, BLOCK_N=block_n)
        ctx.save_for_backward(rows, bias)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, bias = ctx.saved_tensors
        grad_rows = as_rows(grad_out)
        grad_x = torch.empty_like(rows)
        grid, tiles_per_program, block_m, block_n = _grid(*rows.shape)
        partial = torch.empty((grid[0], rows.shape[1]), dtype=torch.float32, device=rows.device)
        if rows.numel():
            with device_of(rows):
                _bias_gelu_backward_kernel[grid](grad_rows, rows, bias, grad_x, partial, *rows.shape, tiles_per_program,
                                                 BLOCK_M=block_m, BLOCK_N=block_n)
        else:
            partial.zero_()
        return grad_x.view(ctx.x_shape), partial.sum(0).to(bias.dtype)


class BiasDropoutResidual(torch.autograd.Function):
    """residual + scale * dropout(x + bias, p), with PLD's scale and dropout's 1/(1-p) folded into one multiplier.

    The dropout mask is not stored: the forward draws one 62-bit Philox seed with `torch.randint` from torch's
    generator of the tensor's device, keeps it in a one-element tensor, and the backward regenerates the mask from it
    (the Philox counter is the element index, so the seed alone fixes the mask and no separate offset is needed).
    Why regenerate rather than store a uint8 mask: a stored mask costs one byte per element for each of the two
    residual adds of every layer (half the size of the bf16 activation it masks) plus its write and read, while the
    regeneration is a few integer ops per element in a kernel that is memory bound anyway. Why torch's generator:
    `torch.manual_seed` then fixes the masks, the seed stays on the device (no host sync), and activation
    checkpointing, which saves and restores torch's RNG state around recomputation, recomputes the same masks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                scale: float) -> torch.Tensor:
        _check_bias(x, bias)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        require_launchable(_bias_dropout_residual_forward_kernel, x, bias, residual)
        check_size(x)
        rows, residual_rows, bias = as_rows(x), as_rows(residual), bias.contiguous()
        has_dropout = p > 0.0
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if has_dropout else None
        multiplier = scale / (1.0 - p)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)
        out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        if rows.numel():
            grid, tiles_per_program, block_m, block_n = _grid(*rows.shape)
            with device_of(rows):
                # Without dropout the seed pointer is never read: any tensor will do.
                _bias_dropout_residual_forward_kernel[grid](rows, bias, residual_rows, out,
                                                            rows if seed is None else seed, p, multiplier,
                                                            *rows.shape, tiles_per_program, HAS_DROPOUT=has_dropout,
                                                            BLOCK_M=block_m, BLOCK_N=block_n)
        ctx.save_for_backward(seed)
        ctx.p, ctx.multiplier, ctx.has_dropout = p, multiplier, has_dropout
        ctx.x_shape, ctx.x_dtype, ctx.bias_dtype, ctx.residual_dtype = x.shape, x.dtype, bias.dtype, residual.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        (seed,) = ctx.saved_tensors
        grad_rows = as_rows(grad_out)
        grad_x = torch.empty(grad_rows.shape, dtype=ctx.x_dtype, device=grad_out.device)
        grid, tiles_per_program, block_m, block_n = _grid(*grad_rows.shape)
        partial = torch.empty((grid[0], grad_rows.shape[1]), dtype=torch.float32, device=grad_out.device)
        if grad_rows.numel():
            with device_of(grad_rows):
                _bias_dropout_residual_backward_kernel[grid](grad_rows, grad_x, partial,
                                                             grad_rows if seed is None else seed, ctx.p,
                                                             ctx.multiplier, *grad_rows.shape, tiles_per_program,
                                                             HAS_DROPOUT=ctx.has_dropout, BLOCK_M=block_m,
                                                             BLOCK_N=block_n)
        else:
            partial.zero_()
        grad_residual = grad_out.to(ctx.residual_dtype)
        return grad_x.view(ctx.x_shape), partial.sum(0).to(ctx.bias_dtype), grad_residual, None, None
