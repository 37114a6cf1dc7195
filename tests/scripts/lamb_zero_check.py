"""Run under `deepspeed --num_gpus 2`: Lamb under ZeRO 0-3, bf16 and CPU offload against a 1-rank reference.

Every run trains the same small model (Embedding, Linear, LayerNorm, biases) for the same steps on the same global
batch. The reference is one rank stepping the whole global batch: a plain torch loop with Lamb and, through
DeepSpeed, ZeRO-0 where every rank feeds the whole global batch (gradient averaging of identical gradients is exact,
so that is a 1-rank ZeRO-0 run). The sharded runs split the batch over the 2 ranks. Rank 0 writes a JSON report to
--out; the pytest in tests/test_lamb.py asserts on it. A launch costs ~20 s before the first step here, so every
check runs in this one.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from ds_pld.compat import apply_workarounds, check_engine  # noqa: E402
from ds_pld.config_errors import ConfigError  # noqa: E402
from ds_pld.optim import Lamb, LambConfig, bind_lamb_to_engine, build_lamb  # noqa: E402
from ds_pld.training.distributed import init_distributed, shutdown_distributed  # noqa: E402

VOCAB, SEQ, CLASSES, GLOBAL_BATCH = 64, 8, 10, 16
LAMB_BLOCK = {"type": "Lamb", "params": {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                                         "bias_correction": True, "max_coeff": 0.5, "min_coeff": 0.01,
                                         "exclude_from_weight_decay": ["bias", "norm"]}}


class TinyNet(nn.Module):
    """Names matter: 'norm' and 'bias' parameters land in the no-decay / no-trust-ratio group."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.fc1 = nn.Linear(32, 48)
        self.norm = nn.LayerNorm(48)
        self.fc2 = nn.Linear(48, 48)
        self.out = nn.Linear(48, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).mean(1)
        h = self.fc2(F.gelu(self.norm(self.fc1(h))))
        return F.cross_entropy(self.out(F.gelu(h)).float(), y)


def make_model() -> TinyNet:
    torch.manual_seed(1234)
    return TinyNet()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,),
                                                                                     generator=g)


def reference_weights(steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain torch, one process, whole global batch: the ground truth."""
    model = make_model()
    opt = build_lamb(LambConfig.from_optimizer_block(LAMB_BLOCK), model, {})
    losses = []
    for step in range(steps):
        loss = model(*batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


def ds_config(stage: int, micro: int, precision: str = "fp32", **zero: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                           "train_batch_size": micro * dist.get_world_size(), "optimizer": LAMB_BLOCK,
                           "zero_optimization": {"stage": stage, **zero}, "steps_per_print": 10 ** 9}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "bf16-fp32-accum":      # ZeRO-1 with fp32 grad accumulation: DeepSpeed's BF16_Optimizer
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def make_engine(cfg: dict[str, Any]) -> tuple[Any, Lamb]:
    """What ds_pld.initialize does with a Lamb block, spelled out."""
    model = make_model()
    cfg = dict(cfg)
    lamb_cfg = LambConfig.from_optimizer_block(cfg.pop("optimizer"))
    optimizer = build_lamb(lamb_cfg, model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    check_engine(engine)       # as ds_pld.attach does: what this DeepSpeed would train wrongly is refused
    apply_workarounds(engine)
    lamb = bind_lamb_to_engine(engine)
    assert lamb is optimizer
    return engine, lamb


def count_all_reduces(lamb: Lamb) -> list[int]:
    """Wrap the layouts' reducers with a counter (public API: set_shard_layouts) to check one all-reduce per call."""
    calls = [0]

    def counted(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(t: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return fn(t)
        return run

    if not lamb.shard_layouts:
        return calls
    wrapped = {}
    for flat, layout in lamb.shard_layouts.items():
        reduce = layout.all_reduce
        wrapped[flat] = layout if reduce is None else dataclasses.replace(layout, all_reduce=counted(reduce))
    lamb.set_shard_layouts(wrapped)
    return calls


def train(engine: Any, first: int, last: int, whole_batch: bool) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(first, last):
        x, y = batch(step)
        if not whole_batch:
            per = GLOBAL_BATCH // world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def full_fp32_weights(engine: Any, stage: int) -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered (collective under ZeRO)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if stage > 0:
            out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        else:
            out[name] = p.detach().float().cpu().clone()
    return out


def rel_errors(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: max |w - ref| / max |ref| (elementwise, relative to the tensor's scale)."""
    return {n: ((weights[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in ref}


def layout_norm_error(engine: Any, lamb: Lamb) -> float:
    """Squared norms summed over every rank's pieces of each slot must equal the full fp32 parameter's: checks the
    layouts bind_lamb_to_engine derived (cover every element once, right slot) independently of Lamb's arithmetic."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper, layouts = engine.optimizer, lamb.shard_layouts
    if not layouts:
        return 0.0
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        groups = zip(wrapper.fp32_partitioned_groups_flat, wrapper.fp16_groups)
    elif isinstance(wrapper, BF16_Optimizer):
        groups = zip(wrapper.fp32_groups_flat_partition, wrapper.bf16_groups)
    else:
        groups = zip(wrapper.single_partition_of_fp32_groups, wrapper.round_robin_bit16_groups)
    worst = 0.0
    for flat, params in groups:
        layout = layouts[flat]
        assert layout.num_params == len(params)
        pieces = torch.zeros(layout.num_params, dtype=torch.float64)
        values = flat.detach().reshape(-1).double().cpu()
        for start, numel, slot in zip(layout.starts, layout.numels, layout.slots):
            pieces[slot] += values[start:start + numel].pow(2).sum()
        dist.all_reduce(pieces)
        full = torch.stack([safe_get_full_fp32_param(p).double().cpu().pow(2).sum() for p in params])
        worst = max(worst, ((pieces - full).abs() / full.clamp_min(1e-30)).max().item())
    return worst


def optimizer_state(engine: Any, lamb: Lamb, stage: int) -> list[dict[str, Any]]:
    """Lamb's state tensors on this rank, in a fixed order (ZeRO-3 empties the groups outside step)."""
    wrapper = engine.optimizer
    if stage == 3:
        tensors = list(wrapper.fp32_partitioned_groups_flat)
    else:
        tensors = [p for g in lamb.param_groups for p in g["params"]]
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in lamb.state[t].items()} for t in tensors]


def same_on_all_ranks(obj: Any) -> bool:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def run_equivalence(name: str, cfg: dict[str, Any], stage: int, steps: int, ref: dict[str, torch.Tensor],
                    whole_batch: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    engine, lamb = make_engine(cfg)
    init_s = time.perf_counter() - start
    calls = count_all_reduces(lamb)
    losses = train(engine, 0, steps, whole_batch)
    stats = lamb.trust_ratio_stats
    errors = rel_errors(full_fp32_weights(engine, stage), ref)
    layout_err = layout_norm_error(engine, lamb)
    result = dict(max_rel_err=max(errors.values()), rel_err=errors, losses=losses,
                  loss_finite=all(math.isfinite(v) for v in losses), trust_ratio_stats=stats,
                  stats_same_on_ranks=same_on_all_ranks(stats), layout_norm_err=layout_err,
                  all_reduces_per_step=calls[0] / steps,
                  wrapper=type(engine.optimizer).__name__, init_s=init_s, total_s=time.perf_counter() - start)
    engine.destroy()
    return result


def run_checkpoint(stage: int, steps: int, precision: str = "fp32", **zero: Any) -> dict[str, Any]:
    """save at steps/2, continue; reload into a fresh engine, compare state, continue: same final weights."""
    start = time.perf_counter()
    half = steps // 2
    root = tempfile.mkdtemp(prefix="lamb_ckpt_") if dist.get_rank() == 0 else None
    holder = [root]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    cfg = ds_config(stage, GLOBAL_BATCH // dist.get_world_size(), precision, **zero)

    engine, lamb = make_engine(cfg)
    train(engine, 0, half, whole_batch=False)
    engine.save_checkpoint(root, tag="half")
    saved_state = optimizer_state(engine, lamb, stage)
    train(engine, half, steps, whole_batch=False)
    uninterrupted = full_fp32_weights(engine, stage)
    engine.destroy()

    engine, lamb = make_engine(cfg)
    engine.load_checkpoint(root, tag="half")
    loaded_state = optimizer_state(engine, lamb, stage)
    state_equal = len(saved_state) == len(loaded_state) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
        for a, b in zip(saved_state, loaded_state))
    has_moments = all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in loaded_state) and bool(loaded_state)
    train(engine, half, steps, whole_batch=False)
    resumed = full_fp32_weights(engine, stage)
    engine.destroy()
    errors = rel_errors(resumed, uninterrupted)
    return dict(state_equal=state_equal and has_moments, max_rel_err=max(errors.values()),
                step_after_load=[s.get("step") for s in loaded_state], total_s=time.perf_counter() - start)


def unless_refused(run: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The run's result, or {"refused": why} when ds_pld refuses the set-up on this DeepSpeed (ds_pld.compat)."""
    try:
        return run(*args, **kwargs)
    except ConfigError as error:
        return {"refused": str(error)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    world = dist.get_world_size()
    # Ranks share the CPU: more intra-op threads than cores per rank makes every step several times slower.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    micro = GLOBAL_BATCH // world
    steps = args.steps

    t0 = time.perf_counter()
    ref, ref_losses = reference_weights(steps)
    report: dict[str, Any] = {"world_size": world, "reference_losses": ref_losses, "runs": {}, "checkpoint": {}}
    runs = report["runs"]
    equivalence = functools.partial(unless_refused, run_equivalence)
    checkpoint = functools.partial(unless_refused, run_checkpoint)
    runs["zero0_whole_batch"] = equivalence("zero0", ds_config(0, GLOBAL_BATCH), 0, steps, ref, whole_batch=True)
    for stage in (1, 2, 3):
        runs[f"zero{stage}"] = equivalence(f"zero{stage}", ds_config(stage, micro), stage, steps, ref)
    for stage in (2, 3):
        runs[f"zero{stage}_offload_cpu"] = equivalence(
            f"zero{stage}_offload", ds_config(stage, micro, offload_optimizer={"device": "cpu"}), stage, steps, ref)
    runs["zero0_bf16"] = equivalence("zero0_bf16", ds_config(0, GLOBAL_BATCH, "bf16"), 0, steps, ref,
                                     whole_batch=True)
    for stage in (1, 2, 3):
        runs[f"zero{stage}_bf16"] = equivalence(f"zero{stage}_bf16", ds_config(stage, micro, "bf16"), stage, steps,
                                                ref)
    runs["zero1_bf16_fp32_accum"] = equivalence("bf16_optimizer", ds_config(1, micro, "bf16-fp32-accum"), 1, steps,
                                                ref)
    for stage in (0, 1, 2, 3):
        report["checkpoint"][f"zero{stage}"] = checkpoint(stage, steps)
    report["checkpoint"]["zero1_bf16_fp32_accum"] = checkpoint(1, steps, "bf16-fp32-accum")

    report["total_s"] = time.perf_counter() - t0
    if dist.get_rank() == 0:
        print(f"total {report['total_s']:.1f}s")
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        for key, run in runs.items():
            if "refused" in run:
                print(f"{key:24s} refused: {run['refused']}")
                continue
            print(f"{key:24s} {run['wrapper']:30s} max_rel_err={run['max_rel_err']:.2e} "
                  f"layout_err={run['layout_norm_err']:.1e} total={run['total_s']:.1f}s "
                  f"all_reduces/step={run['all_reduces_per_step']:.1f} stats={run['trust_ratio_stats']}")
        for key, run in report["checkpoint"].items():
            if "refused" in run:
                print(f"checkpoint {key:24s} refused: {run['refused']}")
                continue
            print(f"checkpoint {key:24s} state_equal={run['state_equal']} max_rel_err={run['max_rel_err']:.2e} "
                  f"total={run['total_s']:.1f}s")
    shutdown_distributed()


if __name__ == "__main__":
    main()
