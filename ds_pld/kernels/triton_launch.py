"""Launch geometry and device checks shared by the Triton kernels (no kernels here).

Every kernel works on a row-major [rows, cols] view of its input. A program owns a column block and walks a run of
row tiles, so the backward kernels can reduce bias/weight gradients over their rows in fp32 registers and write one
partial row per program; torch sums those few partial rows afterwards (a deterministic, atomics-free reduction).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

# Elements one program holds per tile: enough to hide memory latency, small enough to stay in registers.
TILE_ELEMENTS = 4096
# Upper bound on programs along the rows. Bounds the fp32 partial-sum buffers to a few MB while still giving every
# SM of an H100 (132) several programs.
MAX_ROW_PROGRAMS = 512
# Offsets are int32 in the kernels (and the dropout Philox counter is the flat element index).
MAX_ELEMENTS = 2**31 - 1


def interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (decided at import of the defining module)."""
    return isinstance(kernel, InterpretedFunction)


def require_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Fail with a clear message instead of Triton's pointer error when the tensors cannot reach the kernel."""
    if interpreted(kernel):
        return
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"the Triton kernels need all tensors on one CUDA device, got {sorted(map(str, devices))}; "
                         "use model.kernels='torch' or 'auto' for CPU tensors (or set TRITON_INTERPRET=1 before "
                         "importing ds_pld to run them on the CPU for testing)")


def device_of(tensor: torch.Tensor) -> AbstractContextManager:
    """Make the tensor's GPU current for the launch: Triton launches on the current device, which need not be the
    tensor's when a process drives several GPUs."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def check_size(x: torch.Tensor) -> None:
    if x.numel() > MAX_ELEMENTS:
        raise ValueError(f"tensor of {x.numel()} elements exceeds the Triton kernels' int32 indexing "
                         f"({MAX_ELEMENTS}); use model.kernels='torch'")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A contiguous [rows, last dim] view (copies only when `x` is not contiguous). The row count is spelled out
    rather than -1 because torch cannot infer it for a last dim of 0 (an FFN layer EarlyBERT pruned to no neurons)."""
    return x.contiguous().view(math.prod(x.shape[:-1]), x.shape[-1])


def block_cols(n_cols: int, cap: int | None = None) -> int:
    """Power-of-two column block covering `n_cols` (at most `cap`); at least 1, so a width-0 tensor still gets a
    valid geometry (its launch is skipped, but the gradient partial-sum buffers are still sized from it)."""
    block = triton.next_power_of_2(max(1, n_cols))
    return block if cap is None else min(block, cap)


def split_rows(n_rows: int, block_m: int) -> tuple[int, int]:
    """(row programs, row tiles per program) covering `n_rows` with at most MAX_ROW_PROGRAMS programs (at least one,
    so the gradient partial-sum buffers always have a row)."""
    tiles = max(1, triton.cdiv(n_rows, block_m))
    tiles_per_program = triton.cdiv(tiles, MAX_ROW_PROGRAMS)
    return triton.cdiv(tiles, tiles_per_program), tiles_per_program


def num_warps_for(tile_elements: int) -> int:
    """4 warps up to 4096 elements, more for the wide LayerNorm rows (keeps ~32 fp32 values per thread)."""
    return min(16, max(4, tile_elements // 1024))
