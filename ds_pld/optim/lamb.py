"""LAMB with DeepSpeed FusedLamb's update, vectorized with torch._foreach_*, and able to compute per-parameter trust
ratios when the tensors it is handed are flat ZeRO partitions holding pieces of many parameters.

Update (same as csrc/lamb/fused_lamb_cuda_kernel.cu, eps outside the square root by default):
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    u = m / (sqrt(v) + eps) + weight_decay*w            (m, v are not bias corrected inside u)
    r = clamp(||w|| / ||u||, min_coeff, max_coeff), or 1 when either norm is 0; r = 1 in groups with trust_ratio off
    w -= step_size * r * u,  step_size = lr*sqrt(1-b2^t)/(1-b1^t) with bias_correction, else lr
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Sums a small float tensor over the ranks that share a layout and returns the result (same shape and device).
AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ShardLayout:
    """Where the local pieces of original parameters lie inside one flat partition tensor.

    The trust ratio needs each original parameter's whole norms, so the optimizer accumulates squared norms of the
    local pieces into a vector with one slot per original parameter of the (unpartitioned) group, sums that vector
    over the ranks with `all_reduce`, and only then forms the ratios. Every rank must hold the same `num_params`.
    """

    num_params: int
    starts: tuple[int, ...]
    numels: tuple[int, ...]
    slots: tuple[int, ...]
    all_reduce: AllReduce | None = None

    def __post_init__(self) -> None:
        if not len(self.starts) == len(self.numels) == len(self.slots):
            raise ValueError("ShardLayout: starts, numels and slots must have the same length")
        if any(not 0 <= s < self.num_params for s in self.slots):
            raise ValueError(f"ShardLayout: slots must lie in [0, {self.num_params})")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, arXiv:1904.00962) with the update of DeepSpeed's FusedLamb, on any device.

    Param-group keys: lr, betas, eps, weight_decay, bias_correction, max_coeff, min_coeff, eps_inside_sqrt and
    trust_ratio (False: no layer adaptation, r = 1; used for biases and LayerNorm weights). State per tensor:
    `step` (int), `exp_avg`, `exp_avg_sq` - the usual layout, so torch/DeepSpeed checkpoints save and restore it.
    After `step()`, `trust_ratio_stats` gives min/median/max of the ratios of the parameters with trust ratio on.
    `u` is built in a scratch buffer per tensor that lives across steps (not state, never checkpointed).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, bias_correction: bool = True, max_coeff: float = 10.0,
                 min_coeff: float = 0.01, eps_inside_sqrt: bool = False, trust_ratio: bool = True) -> None:
        if lr < 0.0:
            raise ValueError(f"Lamb: invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: invalid betas {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"Lamb: eps ({eps}) and weight_decay ({weight_decay}) must be >= 0")
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"Lamb: need 0 <= min_coeff ({min_coeff}) <= max_coeff ({max_coeff})")
        self._own_params: set[int] = set()
        self._layouts: dict[torch.Tensor, ShardLayout] = {}
        self._foreign_per_tensor_ok = False
        self._bound = False
        self._last_ratios: dict[int, torch.Tensor] = {}
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff,
                        eps_inside_sqrt=eps_inside_sqrt, trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch pickles only defaults/state/param_groups: an unpickled Lamb starts unbound, like a fresh one.
        load_state_dict also calls this, on a live Lamb: its binding must survive (checkpoint resume)."""
        super().__setstate__(state)
        if not hasattr(self, "_bound"):
            self._own_params = {id(p) for group in self.param_groups for p in group["params"]}
            self._layouts, self._foreign_per_tensor_ok, self._bound = {}, False, False
            self._last_ratios, self._scratch = {}, {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Remember the tensors we were built with: a flat tensor we did not get here needs a layout (see step)."""
        super().add_param_group(param_group)
        self._own_params.update(id(p) for p in self.param_groups[-1]["params"])

    # ----------------------------------------------------------------------------------------------- binding
    def set_shard_layouts(self, layouts: dict[torch.Tensor, ShardLayout], per_tensor_copies: bool = False) -> None:
        """Declare how the tensors a ZeRO/bf16 wrapper put in our param groups map to original parameters.

        `layouts` maps each flat partition tensor to its ShardLayout. `per_tensor_copies` says that other tensors we
        were not built with are whole-parameter copies (fp32 masters of a bf16/fp16 wrapper), so per-tensor norms
        are right for them. Called by ds_pld.optim.bind_lamb_to_engine.
        """
        self._layouts = dict(layouts)
        self._foreign_per_tensor_ok = per_tensor_copies
        self._bound = True
        self._last_ratios.clear()

    @property
    def shard_layouts(self) -> dict[torch.Tensor, ShardLayout]:
        """The layouts set by set_shard_layouts (a copy): flat partition tensor -> ShardLayout."""
        return dict(self._layouts)

    @property
    def is_bound(self) -> bool:
        """True once set_shard_layouts ran (bind_lamb_to_engine), even with no layouts (ZeRO-0)."""
        return self._bound

    # ------------------------------------------------------------------------------------------------- stats
    @property
    def trust_ratio_stats(self) -> dict[str, float]:
        """min/median/max of the latest trust ratios of the parameters with trust ratio on; {} before any step.

        Under ZeRO the ratios come from the all-reduced norms, so every rank reports the same numbers."""
        if not self._last_ratios:
            return {}
        ratios = torch.cat([r.reshape(-1).float().cpu() for r in self._last_ratios.values()])
        return dict(min=ratios.min().item(), median=torch.quantile(ratios, 0.5).item(), max=ratios.max().item())

    # -------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB step over the param groups that have gradients (ZeRO-1/2 calls this once per group)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plain_w: list[torch.Tensor] = []      # tensors stepped with r = 1
        plain_u: list[torch.Tensor] = []
        plain_scale: list[float] = []
        seg_w: list[torch.Tensor] = []        # trust-ratio pieces (whole tensors or views of flat partitions)
        seg_u: list[torch.Tensor] = []
        seg_step: list[float] = []
        seg_slot: list[int] = []
        slot_min: list[float] = []
        slot_max: list[float] = []
        reductions: dict[int, tuple[AllReduce, list[int]]] = {}
        stat_slices: list[tuple[int, int, int]] = []   # (key, first slot, end slot)
        device = None

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not self._check_binding(params):
                continue
            updates = self._adam_direction(group, params)
            sizes = [self._step_size(group, self.state[p]["step"]) for p in params]
            if not group["trust_ratio"]:
                plain_w += params
                plain_u += updates
                plain_scale += [-s for s in sizes]
                continue
            for p, u, size in zip(params, updates, sizes):
                base = len(slot_min)
                layout = self._layouts.get(p)
                if layout is None:
                    seg_w.append(p)
                    seg_u.append(u)
                    seg_step.append(size)
                    seg_slot.append(base)
                    count = 1
                else:
                    flat_w, flat_u = p.view(-1), u.view(-1)
                    for start, numel, slot in zip(layout.starts, layout.numels, layout.slots):
                        seg_w.append(flat_w.narrow(0, start, numel))
                        seg_u.append(flat_u.narrow(0, start, numel))
                        seg_step.append(size)
                        seg_slot.append(base + slot)
                    count = layout.num_params
                    if layout.all_reduce is not None:
                        reductions.setdefault(id(layout.all_reduce), (layout.all_reduce, []))[1].extend(
                            range(base, base + count))
                slot_min += [group["min_coeff"]] * count
                slot_max += [group["max_coeff"]] * count
                stat_slices.append((id(p), base, base + count))
                device = p.device

        seg_scale: list[float] = []
        if slot_min:
            ratios = self._trust_ratios(seg_w, seg_u, seg_slot, slot_min, slot_max, reductions, device)
            values = ratios.tolist()
            seg_scale = [-size * values[slot] for size, slot in zip(seg_step, seg_slot)]
            for key, lo, hi in stat_slices:
                self._last_ratios[key] = ratios[lo:hi]

        tensors, updates, scales = plain_w + seg_w, plain_u + seg_u, plain_scale + seg_scale
        if tensors:
            torch._foreach_mul_(updates, scales)
            torch._foreach_add_(tensors, updates)
        return loss

    def _check_binding(self, params: list[torch.Tensor]) -> bool:
        """False for DeepSpeed's state-initialization call (all-zero grads before binding): state is created, no
        update happens. Raises if a wrapper handed us flat partitions and nobody told us their layout."""
        foreign = [p for p in params if id(p) not in self._own_params and p not in self._layouts]
        if not foreign or self._foreign_per_tensor_ok:
            return True
        if not self.is_bound and all(not p.grad.any() for p in params):
            for p in params:
                self._init_state(p)
            return False
        raise RuntimeError(
            "Lamb was handed tensors it was not built with (ZeRO/bf16 flat partitions?) without their layout, so "
            "per-parameter trust ratios cannot be computed. Call ds_pld.optim.bind_lamb_to_engine(engine) right "
            "after deepspeed.initialize (ds_pld.initialize does this).")

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _adam_direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update the moments in place and return u = m/(sqrt(v)+eps) + weight_decay*w (scratch buffers)."""
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self._init_state(p)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # u is built in a scratch buffer kept between steps: a fresh parameter-sized tensor every step costs more
        # than the arithmetic on CPU (page faults), and it is the same peak memory as AdamW's temporary.
        updates = self._scratch_for(params)
        torch._foreach_copy_(updates, exp_avg_sqs)
        if group["eps_inside_sqrt"]:
            torch._foreach_add_(updates, eps)
            torch._foreach_sqrt_(updates)
        else:
            torch._foreach_sqrt_(updates)
            torch._foreach_add_(updates, eps)
        torch._foreach_reciprocal_(updates)
        torch._foreach_mul_(updates, exp_avgs)
        if group["weight_decay"] != 0.0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        return updates

    def _scratch_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """One reusable buffer per tensor for u (not optimizer state: never checkpointed)."""
        buffers = []
        for p in params:
            buf = self._scratch.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = self._scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            buffers.append(buf)
        return buffers

    @staticmethod
    def _step_size(group: dict[str, Any], step: int) -> float:
        if not group["bias_correction"]:
            return group["lr"]
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    @staticmethod
    def _trust_ratios(seg_w: list[torch.Tensor], seg_u: list[torch.Tensor], seg_slot: list[int],
                      slot_min: list[float], slot_max: list[float],
                      reductions: dict[int, tuple[AllReduce, list[int]]], device: torch.device) -> torch.Tensor:
        """Per-slot ratios ||w||/||u||: squared norms of the pieces are summed per slot, then over ranks (one
        all-reduce per process group and step call), so a parameter split across ranks gets its whole norm.
        A rank may hold no piece at all (a partition of padding) and still takes part in the all-reduce."""
        squares = torch.zeros(2, len(slot_min), dtype=torch.float32, device=device)
        if seg_w:
            w_norms = torch.stack(torch._foreach_norm(seg_w)).float()
            u_norms = torch.stack(torch._foreach_norm(seg_u)).float()
            index = torch.tensor(seg_slot, device=device)
            squares[0].index_add_(0, index, w_norms * w_norms)
            squares[1].index_add_(0, index, u_norms * u_norms)
        for all_reduce, slots in reductions.values():
            cols = torch.tensor(slots, device=device)
            squares[:, cols] = all_reduce(squares[:, cols].contiguous())
        w_norm, u_norm = squares.sqrt().unbind(0)
        low = torch.tensor(slot_min, dtype=torch.float32, device=device)
        high = torch.tensor(slot_max, dtype=torch.float32, device=device)
        ratio = torch.maximum(torch.minimum(w_norm / u_norm, high), low)   # FusedLamb's order: max clamp, then min
        return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
