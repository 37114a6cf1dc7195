"""Step time under ZeRO-2 and ZeRO-3, each with and without Progressive Layer Dropping (issue 14), on real ranks, with
ZeRO-3's own bookkeeping counted: how often its prefetch trace is invalidated, how many parameters it fetches outside
the module hooks (DeepSpeed's "external parameters"), how many elements each rank gathers and reduces per step, and
how many parameter elements stay gathered after a forward.

    OMP_NUM_THREADS=1 python -m deepspeed.launcher.runner --num_gpus 2 benchmarks/zero3_pld.py --seq 16 --micro_batch 2

(on CPU the launcher starts `--num_gpus` gloo ranks; short sequences make communication a larger share of the step,
as on a GPU). Figures: docs/benchmarks.md, "ZeRO-3 under PLD". One engine per arm is built up front from the same
weights, and every optimizer step runs each arm once, in an order that rotates from step to step, on the same batches;
so machine noise and drift hit every arm alike. The PLD arms make the same drop decisions (same seed, same step
counters), and theta decays fast (gamma 1) to its floor during the untimed warm-up steps.

An arm is `z<stage>` plus flags: `+pld`; `-leaf` clears the ZeRO-3 leaf flag that every `PreLNLayer` sets (the
layout before issue 14: the layer's weights are gathered as "external parameters"); `+encleaf` applies
`ds_pld.models.zero3.prepare_zero3_pld` (the whole encoder one ZeRO-3 leaf, so PLD keeps the module order constant);
`+nopf` turns ZeRO-3's prefetching off (`stage3_prefetch_bucket_size` 0). Rank 0 prints a Markdown table (ratios to
the first arm) and a JSON line. Trace invalidations are counted by wrapping each ZeRO-3 engine's (private)
`_invalidate_trace`, on every rank; `zero_optimization.log_trace_cache_warnings` prints the same events on rank 0.
If `ds_pld.initialize` calls `prepare_zero3_pld` itself, every ZeRO-3 arm with PLD gets the encoder leaf.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from deepspeed.utils import unset_z3_leaf_modules, z3_leaf_module  # noqa: E402

import ds_pld  # noqa: E402
from ds_pld.models import build_model  # noqa: E402
from ds_pld.models.bert import PreLNLayer  # noqa: E402
from ds_pld.models.zero3 import prepare_zero3_pld  # noqa: E402
from ds_pld.timing import StepTimer  # noqa: E402
from ds_pld.training.distributed import init_distributed, shutdown_distributed  # noqa: E402

DEFAULT_ARMS = ("z2", "z2+pld", "z3-leaf", "z3", "z3+pld-leaf", "z3+pld", "z3+pld+encleaf")


@dataclass
class Arm:
    """One engine and what was measured on it."""

    name: str
    stage: int
    pld: bool
    layer_leaf: bool = True
    encoder_leaf: bool = False
    prefetch: bool = True
    engine: Any = None
    times: list[float] = field(default_factory=list)
    layers_run: list[int] = field(default_factory=list)
    invalidations: list[int] = field(default_factory=list)
    gathered: list[int] = field(default_factory=list)  # all-gathered elements per step (this rank's output size)
    reduced: list[int] = field(default_factory=list)  # elements entering reductions per step (this rank's input)
    live: list[int] = field(default_factory=list)  # partitioned parameters' elements held gathered after a forward
    invalidated: int = 0
    external: int = 0
    leaves: int = 0


def parse_arm(name: str) -> Arm:
    parts = name.replace("-", "+-").split("+")
    if not parts[0].startswith("z") or parts[0][1:] not in ("0", "1", "2", "3"):
        raise SystemExit(f"arm {name!r}: must start with z0..z3")
    flags = set(parts[1:])
    unknown = flags - {"pld", "-leaf", "encleaf", "nopf"}
    if unknown:
        raise SystemExit(f"arm {name!r}: unknown flags {sorted(unknown)}")
    return Arm(name, int(parts[0][1:]), "pld" in flags, "-leaf" not in flags, "encleaf" in flags, "nopf" not in flags)


def build_arm(arm: Arm, args: argparse.Namespace) -> None:
    zero: dict[str, Any] = {"stage": arm.stage}
    if arm.stage == 3:
        zero["stage3_param_persistence_threshold"] = args.persistence_threshold
        if not arm.prefetch:
            zero["stage3_prefetch_bucket_size"] = 0
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accumulation,
        "steps_per_print": 10**9, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": zero,
        "progressive_layer_drop": {"enabled": arm.pld, "theta": args.theta, "gamma": 1.0, "seed": 5},
    }
    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=args.vocab, num_layers=args.layers,
                        max_position_embeddings=max(args.seq, 32), kernels="torch")
    if not arm.layer_leaf:
        unset_z3_leaf_modules(model, [PreLNLayer])
    if arm.encoder_leaf and not prepare_zero3_pld(model, config, arm.pld):
        raise SystemExit(f"arm {arm.name!r}: prepare_zero3_pld marked no encoder (it needs ZeRO-3 and PLD)")
    arm.leaves = sum(z3_leaf_module(m) for m in model.modules())
    arm.engine, *_ = ds_pld.initialize(model=model, config=config)
    if arm.stage == 3:
        coordinator = arm.engine.optimizer.parameter_offload.get_param_coordinator()
        invalidate = coordinator._invalidate_trace

        def counting_invalidate() -> None:
            arm.invalidated += 1
            invalidate()

        coordinator._invalidate_trace = counting_invalidate  # this engine's coordinator only


# DeepSpeed backend methods that move parameters or gradients, and the argument (name, position) whose elements count:
# a gather's output, a reduction's input.
GATHERS = (("all_gather", ("tensor_list", 0)), ("all_gather_into_tensor", ("output_tensor", 0)),
           ("all_gather_base", ("output_tensor", 0)), ("all_gather_coalesced", ("output_tensors", 0)))
REDUCTIONS = (("all_reduce", ("tensor", 0)), ("inference_all_reduce", ("tensor", 0)),
              ("all_reduce_coalesced", ("tensors", 0)), ("reduce", ("tensor", 0)),
              ("reduce_scatter", ("input_list", 1)), ("reduce_scatter_tensor", ("input_tensor", 1)))


def counted(real: Any, argument: tuple[str, int], counter: dict[str, int], key: str) -> Any:
    """`real` (a backend method, called by position or keyword) that first adds the elements of `argument` (a tensor
    or a list of tensors) to counter[key]."""
    name, position = argument

    def call(*args: Any, **kwargs: Any) -> Any:
        value = kwargs[name] if name in kwargs else args[position]
        counter[key] += sum(t.numel() for t in value) if isinstance(value, (list, tuple)) else value.numel()
        return real(*args, **kwargs)

    return call


def count_traffic(counter: dict[str, int]) -> None:
    """Add the elements every gather / reduction of DeepSpeed's communication backend moves to
    counter["gathered"] / counter["reduced"]."""
    backend = deepspeed.comm.comm.cdb
    for key, methods in (("gathered", GATHERS), ("reduced", REDUCTIONS)):
        for name, argument in methods:
            if hasattr(backend, name):
                setattr(backend, name, counted(getattr(backend, name), argument, counter, key))


def batch(step: int, micro: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + dist.get_rank())
    ids = torch.randint(5, args.vocab, (args.micro_batch, args.seq), generator=generator)
    labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)
    return ids, labels


def run_step(arm: Arm, step: int, args: argparse.Namespace, traffic: dict[str, int]) -> None:
    engine = arm.engine
    invalidated = arm.invalidated
    traffic.update(gathered=0, reduced=0)
    ran, live = [], 0
    timer = StepTimer(engine.device).start()
    for micro in range(args.accumulation):
        ids, labels = batch(step, micro, args)
        out = engine(ids, labels=labels)
        if arm.stage == 3:
            live = max(live, live_parameters(engine.module))
        engine.backward(out.loss)
        engine.step()
        ran.append(out.layers_run)
    elapsed = timer.stop()
    if step >= args.warmup:
        arm.times.append(elapsed)
        arm.layers_run.extend(ran)
        arm.invalidations.append(arm.invalidated - invalidated)
        arm.gathered.append(traffic["gathered"])
        arm.reduced.append(traffic["reduced"])
        arm.live.append(live)


def live_parameters(module: torch.nn.Module) -> int:
    """Elements of the partitioned (not persistent) parameters that are gathered now: ZeRO-3's parameter memory
    beyond its partitions, after a forward (where it keeps what the backward will reuse)."""
    return sum(p.ds_numel for p in module.parameters() if not p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE)


def external_parameters(module: torch.nn.Module) -> int:
    """Parameters ZeRO-3 registered on a module other than their owner: fetched through the external-parameter path
    (a parameter read in a forward its owner's hooks did not run)."""
    return sum(len(getattr(m, "_external_params", {})) for m in module.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-mini")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--theta", type=float, default=0.5, help="PLD's theta floor")
    parser.add_argument("--persistence_threshold", type=int, default=int(1e5),
                        help="stage3_param_persistence_threshold (DeepSpeed's default 1e5): smaller parameters are "
                             "never partitioned")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps per arm first")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    parser.add_argument("--json", default=None, help="also write the result here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()

    init_distributed()
    arms = [parse_arm(name) for name in args.arms]
    for arm in arms:
        build_arm(arm, args)
    traffic = {"gathered": 0, "reduced": 0}
    count_traffic(traffic)
    for step in range(args.warmup + args.steps):
        shift = step % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            run_step(arm, step, args, traffic)
    for arm in arms:
        arm.external = external_parameters(arm.engine.module)
    base = statistics.median(arms[0].times)
    rows = []
    for arm in arms:
        plain = next((a for a in arms if a.stage == arm.stage and not a.pld and a.layer_leaf == arm.layer_leaf
                      and a.prefetch == arm.prefetch), None) if arm.pld else None
        rows.append({
            "arm": arm.name, "median_step_s": statistics.median(arm.times),
            "ratio_to_first": statistics.median(arm.times) / base,
            "paired_ratio_median": statistics.median(t / b for t, b in zip(arm.times, arms[0].times)),
            "pld_vs": None if plain is None else plain.name,
            "pld_paired_ratio": None if plain is None else statistics.median(
                t / b for t, b in zip(arm.times, plain.times)),
            "layers_run_mean": statistics.mean(arm.layers_run),
            "trace_invalidations_per_step": statistics.mean(arm.invalidations),
            "gathered_elements_per_step": statistics.median(arm.gathered),
            "reduced_elements_per_step": statistics.median(arm.reduced),
            "gathered_after_forward": max(arm.live),
            "external_params": arm.external, "z3_leaf_modules": arm.leaves,
        })
    for arm in arms:
        arm.engine.destroy()
    if dist.get_rank() == 0:
        print(f"| arm | median step (s) | / {arms[0].name} (ratio of medians) | paired ratio (median) | layers run "
              "| trace invalidations / step | gathered M elements / step | reduced M elements / step "
              "| M elements held gathered after forward (max) | external params | leaf modules |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['arm']} | {row['median_step_s']:.3f} | {row['ratio_to_first']:.3f} "
                  f"| {row['paired_ratio_median']:.3f} | {row['layers_run_mean']:.2f} "
                  f"| {row['trace_invalidations_per_step']:.2f} | {row['gathered_elements_per_step'] / 1e6:.2f} "
                  f"| {row['reduced_elements_per_step'] / 1e6:.2f} | {row['gathered_after_forward'] / 1e6:.2f} "
                  f"| {row['external_params']} "
                  f"| {row['z3_leaf_modules']} |")
        for row in rows:
            if row["pld_vs"] is not None:
                print(f"{row['arm']} / {row['pld_vs']}: paired median {row['pld_paired_ratio']:.3f}")
        result = {"rows": rows, "args": vars(args), "world_size": dist.get_world_size(),
                  "load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "deepspeed": deepspeed.__version__}
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
