"""Tell a Lamb wrapped by DeepSpeed how the flat fp32 partitions it steps map back to the original parameters.

ZeRO-1/2 and DeepSpeed's BF16_Optimizer flatten each param group, cut the flat buffer into one equal slice per
data-parallel rank and hand the wrapped optimizer that slice; ZeRO-3 flattens the per-parameter partitions of a
sub-group. A trust ratio computed on such a tensor would mix many parameters and see only part of some. For every
flat tensor we record which piece of which original parameter lies where (a ShardLayout) plus an all-reduce over
the group's data-parallel ranks, so Lamb can sum each parameter's squared norms over its pieces and ranks.

This module is the one place that reads ZeRO's private partition layout (listed in docs/architecture.md): every
wrapper's fields are asked for by name first (`_require`), so a DeepSpeed release that renames one fails at bind time
with the field, the wrapper and the version named, never mid-training with a wrong trust ratio.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ds_pld.config_errors import ConfigError
from ds_pld.optim.lamb import AllReduce, Lamb, ShardLayout


class _SumOverGroup:
    """Sum over a process group, done on the device DeepSpeed communicates from (offloaded partitions live on the
    CPU, NCCL wants accelerator tensors); returns a new tensor on the input's device."""

    def __init__(self, group: Any, device: str) -> None:
        self.group = group
        self.device = device

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        from deepspeed import comm as dist

        buffer = tensor.to(self.device, copy=True)
        dist.all_reduce(buffer, group=self.group)
        return buffer.to(tensor.device)


def find_lamb(engine: Any) -> Lamb | None:
    """The Lamb inside a DeepSpeed engine (its base optimizer), or None; the training loop reads
    `find_lamb(engine).trust_ratio_stats` from it."""
    optimizer = getattr(engine, "basic_optimizer", None)
    return optimizer if isinstance(optimizer, Lamb) else None


def _pieces(offsets: Sequence[int], numels: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int], list[int]]:
    """Intersections of parameters [offset, offset+numel) of a flat buffer with this rank's slice [lo, hi)."""
    starts, sizes, slots = [], [], []
    for slot, (offset, numel) in enumerate(zip(offsets, numels)):
        left, right = max(offset, lo), min(offset + numel, hi)
        if left < right:
            starts.append(left - lo)
            sizes.append(right - left)
            slots.append(slot)
    return starts, sizes, slots


def _check_hp_mapping(params: Sequence[torch.Tensor], starts: list[int], sizes: list[int], slots: list[int]) -> None:
    """Cross-check our arithmetic with DeepSpeed's own lp->hp fragment links, so a layout change fails loudly."""
    ours = {slot: (start, size) for start, size, slot in zip(starts, sizes, slots)}
    for slot, param in enumerate(params):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        theirs = (mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)
        if ours.get(slot) != theirs:
            raise RuntimeError(f"Lamb/ZeRO layout mismatch for parameter {slot}: computed {ours.get(slot)}, "
                               f"DeepSpeed maps {theirs}")


# DeepSpeed 0.19.8 also records `round_robin_bit16_offsets` (it pads each parameter); earlier releases pack the
# parameters back to back and record none (read with a fallback; _check_hp_mapping catches any other layout).
ZERO12_FIELDS = ("single_partition_of_fp32_groups", "real_dp_process_group", "partition_size",
                 "round_robin_bit16_meta", "round_robin_bit16_groups")
BF16_FIELDS = ("fp32_groups_flat_partition", "real_dp_process_group", "bf16_groups_flat", "bf16_groups")
ZERO3_FIELDS = ("fp32_partitioned_groups_flat", "fp16_groups", "dp_process_group")


def _require(wrapper: Any, fields: tuple[str, ...]) -> None:
    """The private fields of DeepSpeed's optimizer wrapper this bridge reads, or one clear error."""
    missing = [name for name in fields if not hasattr(wrapper, name)]
    if missing:
        import deepspeed

        raise ConfigError(f"Lamb under ZeRO reads {type(wrapper).__name__}.{{{', '.join(missing)}}}, which DeepSpeed "
                          f"{deepspeed.__version__} does not have (ds_pld supports DeepSpeed 0.17-0.19): use another "
                          "optimizer type, or a supported DeepSpeed")


def _zero12_layouts(wrapper: Any, reducer: Callable[[Any], AllReduce | None]) -> dict[torch.Tensor, ShardLayout]:
    from deepspeed import comm as dist

    _require(wrapper, ZERO12_FIELDS)

    offsets = getattr(wrapper, "round_robin_bit16_offsets", None)
    layouts = {}
    for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
        group = wrapper.real_dp_process_group[i]
        size = int(wrapper.partition_size[i])
        lo = dist.get_rank(group=group) * size
        numels = [m.numel() for m in wrapper.round_robin_bit16_meta[i]]
        starts_of = offsets[i] if offsets is not None else [sum(numels[:k]) for k in range(len(numels))]
        starts, sizes, slots = _pieces(starts_of, numels, lo, lo + size)
        _check_hp_mapping(wrapper.round_robin_bit16_groups[i], starts, sizes, slots)
        layouts[flat] = ShardLayout(len(numels), tuple(starts), tuple(sizes), tuple(slots), reducer(group))
    return layouts


def _bf16_layouts(wrapper: Any, reducer: Callable[[Any], AllReduce | None]) -> dict[torch.Tensor, ShardLayout]:
    from deepspeed import comm as dist

    _require(wrapper, BF16_FIELDS)

    layouts = {}
    for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
        group = wrapper.real_dp_process_group[i]
        size = wrapper.bf16_groups_flat[i].numel() // dist.get_world_size(group=group)
        lo = dist.get_rank(group=group) * size
        numels = [p.numel() for p in wrapper.bf16_groups[i]]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        starts, sizes, slots = _pieces(offsets, numels, lo, lo + size)
        _check_hp_mapping(wrapper.bf16_groups[i], starts, sizes, slots)
        layouts[flat] = ShardLayout(len(numels), tuple(starts), tuple(sizes), tuple(slots), reducer(group))
    return layouts


def _zero3_layouts(wrapper: Any, reducer: Callable[[Any], AllReduce | None]) -> dict[torch.Tensor, ShardLayout]:
    """ZeRO-3 partitions every parameter: rank r holds elements [r*n, (r+1)*n) of it (n = its partition size, the
    last piece padded); a sub-group's fp32 tensor is the concatenation of its parameters' padded partitions."""
    from deepspeed import comm as dist

    _require(wrapper, ZERO3_FIELDS)
    groups = getattr(wrapper, "sub_group_process_groups", None)
    layouts = {}
    for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
        group = groups[i] if groups else wrapper.dp_process_group
        rank = dist.get_rank(group=group)
        starts, sizes, slots, offset = [], [], [], 0
        for slot, param in enumerate(wrapper.fp16_groups[i]):
            part = int(param.ds_tensor.ds_numel)
            local = max(0, min(part, int(param.ds_numel) - rank * part))
            if local:
                starts.append(offset)
                sizes.append(local)
                slots.append(slot)
            offset += part
        if flat.numel() and offset != flat.numel():
            raise RuntimeError(f"Lamb/ZeRO-3 layout mismatch in sub-group {i}: {offset} != {flat.numel()} elements")
        layouts[flat] = ShardLayout(len(wrapper.fp16_groups[i]), tuple(starts), tuple(sizes), tuple(slots),
                                    reducer(group))
    return layouts


def bind_lamb_to_engine(engine: Any) -> Lamb | None:
    """Bind the engine's Lamb (if its base optimizer is one) to the way DeepSpeed wrapped it; returns the Lamb.

    Must run right after deepspeed.initialize, before the first step: without it Lamb refuses flat partitions."""
    lamb = find_lamb(engine)
    if lamb is None:
        return None
    wrapper = engine.optimizer
    if wrapper is lamb:            # ZeRO-0, fp32: Lamb steps the model's own parameters
        lamb.set_shard_layouts({})
        return lamb

    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    device = get_accelerator().current_device_name()
    reducers: dict[int, AllReduce | None] = {}

    def reducer(group: Any) -> AllReduce | None:
        """One reducer per process group, so all flat tensors of a step call share one all-reduce."""
        if id(group) not in reducers:
            reducers[id(group)] = _SumOverGroup(group, device) if dist.get_world_size(group=group) > 1 else None
        return reducers[id(group)]

    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        layouts = _zero12_layouts(wrapper, reducer)
    elif isinstance(wrapper, BF16_Optimizer):
        layouts = _bf16_layouts(wrapper, reducer)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        layouts = _zero3_layouts(wrapper, reducer)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):   # ZeRO-0 bf16/fp16: whole-tensor fp32 master copies
        lamb.set_shard_layouts({}, per_tensor_copies=True)
        return lamb
    else:
        raise ConfigError(f"Lamb cannot run under DeepSpeed's {type(wrapper).__name__}; supported: ZeRO stages 0-3 "
                          "in fp32, bf16 or fp16")
    lamb.set_shard_layouts(layouts)
    return lamb
