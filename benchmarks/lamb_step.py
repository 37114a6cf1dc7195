"""Optimizer step time: ds_pld Lamb vs torch.optim.AdamW(foreach=True) (and DeepSpeed FusedLamb on CUDA).

Parameters are those of build_model('bert-base') (110M), with random gradients; both optimizers get the same two
param groups (decay / no decay for biases and LayerNorm weights), as in the 64K recipe. Steps are timed after
warm-up, alternating between the optimizers; the headline ratio is the median over repeats of (Lamb step i) /
(AdamW step i), which a shared machine's load changes affect least. Goal: Lamb <= 1.3x AdamW.

    python benchmarks/lamb_step.py [--preset bert-base] [--steps 10] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds_pld.models import build_model  # noqa: E402
from ds_pld.optim import LambConfig, build_lamb  # noqa: E402
from ds_pld.timing import StepTimer  # noqa: E402

RECIPE = {"type": "Lamb", "params": {"lr": 11e-3, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                                     "bias_correction": False, "max_coeff": 0.3, "min_coeff": 0.01,
                                     "exclude_from_weight_decay": ["bias", "norm"]}}


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and process-CPU seconds per step; the optimizers alternate step by step, so a load change on a shared
    machine hits all of them alike (CPU time is the steadier figure there)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with StepTimer(device, time.process_time) as cpu, StepTimer(device) as wall:
                step()
            times[name][0].append(wall.seconds)
            times[name][1].append(cpu.seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_model(args.preset).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    cfg = LambConfig.from_optimizer_block(RECIPE)
    lamb = build_lamb(cfg, model, {})
    adam_groups = [dict(params=g["params"], weight_decay=g["weight_decay"]) for g in lamb.param_groups]
    adamw = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)

    steps: dict[str, Callable[[], None]] = {"ds_pld Lamb": lamb.step, "torch AdamW(foreach)": adamw.step}
    if device.type == "cuda":
        try:
            from deepspeed.ops.lamb import FusedLamb

            fused = FusedLamb(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, bias_correction=False,
                              max_coeff=cfg.max_coeff, min_coeff=cfg.min_coeff)
            steps["DeepSpeed FusedLamb"] = fused.step
        except Exception as err:  # the CUDA extension may not build here; report and go on
            print(f"FusedLamb unavailable: {type(err).__name__}: {err}")
    results = time_interleaved(steps, device, args.warmup, args.steps)

    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"{args.preset}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, device={device}"
          + (f", torch threads={threads}" if threads else ""))
    base_wall, base_cpu = results["torch AdamW(foreach)"]
    med = statistics.median
    for name, (wall, cpu) in results.items():
        paired = med([a / b for a, b in zip(wall, base_wall)])   # step i vs AdamW's step i, run back to back
        print(f"  {name:22s} wall median {med(wall) * 1e3:7.1f} ms, min {min(wall) * 1e3:7.1f} ms, "
              f"CPU median {med(cpu) * 1e3:7.1f} ms | vs AdamW: paired {paired:.2f}x, "
              f"median {med(wall) / med(base_wall):.2f}x, min {min(wall) / min(base_wall):.2f}x")


if __name__ == "__main__":
    main()
