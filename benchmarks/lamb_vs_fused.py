"""Our LAMB (`ds_pld.optim.Lamb`) against DeepSpeed's CUDA `FusedLamb`: same parameters, same gradients, N steps,
then the largest relative difference of the weights.

Why: our LAMB claims FusedLamb's update (docs/lamb.md) but runs on any device and under ZeRO; this is the check
against the real CUDA extension. Without a GPU (or with `--reference torch`) the reference is a one tensor at a time
transcription of csrc/lamb/fused_lamb_cuda_kernel.cu instead, so the script also runs on the CPU. The transcription
computes in fp32 like the kernel: over 20 steps of the 64K recipe, fp32 arithmetic itself drifts ~8e-6 from float64
(measured with this transcription), which would eat most of the 1e-5 budget and hide a real difference.

The tensors span scales (trust ratios from ~0.1 to ~3, so the clamps bite some and not others) and include an
all-zero one (a fresh bias: ratio 1). Each recipe runs with its own fresh copies.

    python benchmarks/lamb_vs_fused.py                                   # CUDA: vs FusedLamb, 20 steps
    python benchmarks/lamb_vs_fused.py --device cpu --reference torch    # CPU: vs the fp32 transcription
    python benchmarks/lamb_vs_fused.py --device cpu --small              # smaller tensors (a quick CPU check)
    python benchmarks/lamb_vs_fused.py --json out/lamb.json              # also write the results as JSON

Exit status: 0 when every recipe is within `--tolerance`, 1 when one is not, 2 when the reference cannot run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ds_pld.optim import Lamb  # noqa: E402

UNAVAILABLE_EXIT_CODE = 2
# (rows, cols, scale): bert-base shapes (the word embeddings too: FusedLamb reduces big tensors over many blocks),
# scaled so the trust ratios differ; scale 0 is a freshly zeroed bias.
TENSORS = ((30522, 768, 0.02), (768, 768, 0.02), (3072, 768, 0.05), (768, 3072, 0.5), (768, 1, 1.0), (3072, 1, 0.0),
           (30, 17, 3.0))
SMALL_TENSORS = ((512, 64, 0.02), (256, 64, 0.05), (64, 256, 0.5), (64, 1, 1.0), (256, 1, 0.0), (30, 17, 3.0))
RECIPES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # The 64K-batch recipe of ds_configs/pld_lamb.json: no bias correction, trust ratio capped at 0.3.
    "pld_lamb_64k": dict(lr=11e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=False,
                         max_coeff=0.3, min_coeff=0.01),
    # FusedLamb's defaults, with bias correction and a weight decay.
    "defaults_bias_correction": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                     bias_correction=True, max_coeff=10.0, min_coeff=0.01),
})


def make_problem(steps: int, shapes: tuple[tuple[int, int, float], ...] = TENSORS, seed: int = 0,
                 ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial weights and one gradient list per step, on the CPU in fp32 (moved to the device by the callers)."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(rows, cols, generator=generator) * scale for rows, cols, scale in shapes]
    grads = [[torch.randn(w.shape, generator=generator) * 1e-2 * (1 + index) for index, w in enumerate(weights)]
             for _ in range(steps)]
    return weights, grads


def run_optimizer(build: Callable[[list[torch.Tensor]], torch.optim.Optimizer], weights: list[torch.Tensor],
                  grads: list[list[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """Fresh fp32 parameters on `device`, stepped once per gradient list; returns the final weights on the CPU."""
    params = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
    optimizer = build(params)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(device)
        optimizer.step()
    return [p.detach().double().cpu() for p in params]


def transcribed_reference(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float,
                          betas: tuple[float, float], eps: float, weight_decay: float, bias_correction: bool,
                          max_coeff: float, min_coeff: float) -> list[torch.Tensor]:
    """FusedLamb's kernel, one tensor at a time in fp32 on the CPU: the stand-in for the CUDA extension. Written
    independently of ds_pld.optim (plain tensor ops, Python-float ratio and clamps)."""
    beta1, beta2 = betas
    ws = [w.float().clone() for w in weights]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, step_grads in enumerate(grads, start=1):
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if bias_correction else lr
        for i, grad in enumerate(step_grads):
            grad = grad.float()
            ms[i] = beta1 * ms[i] + (1 - beta1) * grad
            vs[i] = beta2 * vs[i] + (1 - beta2) * grad * grad
            update = ms[i] / (vs[i].sqrt() + eps) + weight_decay * ws[i]
            w_norm, u_norm = ws[i].norm().item(), update.norm().item()
            ratio = 1.0
            if w_norm > 0 and u_norm > 0:
                ratio = min(w_norm / u_norm, max_coeff)
                ratio = max(ratio, min_coeff)
            ws[i] = ws[i] - step_size * ratio * update
    return [w.double() for w in ws]


def differences(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, Any]:
    """Per tensor ||ours - ref|| / ||ref|| (the absolute norm where ||ref|| is 0), and the largest element gap."""
    relative = []
    for a, b in zip(ours, ref):
        gap, norm = (a - b).norm().item(), b.norm().item()
        relative.append(gap / norm if norm > 0 else gap)
    return {"max_rel_diff": max(relative), "rel_diff_per_tensor": relative,
            "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(ours, ref))}


def fused_lamb_builder(recipe: dict[str, Any]) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    from deepspeed.ops.lamb import FusedLamb

    return lambda params: FusedLamb(params, **recipe)


def fused_unavailable(device: torch.device) -> str | None:
    """Why FusedLamb cannot run here (None when it can): it is a CUDA extension that DeepSpeed JIT-builds with nvcc."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"FusedLamb is CUDA-only and {device} is not an available CUDA device"
    try:
        import deepspeed.ops.lamb  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as err:
        return f"deepspeed cannot be imported: {err}"
    if CUDA_HOME is None:
        return "no CUDA toolkit (CUDA_HOME / nvcc) to JIT-build DeepSpeed's fused_lamb op"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference", choices=("auto", "fused", "torch"), default="auto",
                        help="fused: DeepSpeed FusedLamb (CUDA); torch: the float64 transcription; auto: fused on "
                             "CUDA, else torch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed relative weight difference")
    parser.add_argument("--small", action="store_true", help="small tensors instead of bert-base's (CPU checks)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = SMALL_TENSORS if args.small else TENSORS
    reference = args.reference if args.reference != "auto" else ("fused" if device.type == "cuda" else "torch")
    result: dict[str, Any] = {"device": str(device), "reference": reference, "steps": args.steps,
                              "tolerance": args.tolerance, "tensors": [list(t) for t in shapes], "recipes": {}}
    if device.type == "cuda" and torch.cuda.is_available():
        result["device_name"] = torch.cuda.get_device_name(device)
    why_not = fused_unavailable(device) if reference == "fused" else None
    if why_not is not None:
        result.update(passed=False, error=why_not)
        print(f"lamb_vs_fused: {why_not}", file=sys.stderr)
        exit_code = UNAVAILABLE_EXIT_CODE
    else:
        weights, grads = make_problem(args.steps, shapes)
        for name, recipe in RECIPES.items():
            ours = run_optimizer(lambda params, recipe=recipe: Lamb(params, **recipe), weights, grads, device)
            if reference == "fused":
                ref = run_optimizer(fused_lamb_builder(recipe), weights, grads, device)
            else:
                ref = transcribed_reference(weights, grads, **recipe)
            moved = max((a - w.double()).norm().item() / max(w.norm().item(), 1.0) for a, w in zip(ref, weights))
            result["recipes"][name] = {**differences(ours, ref), "reference_moved": moved, "params": dict(recipe)}
            print(f"{name}: max relative weight difference {result['recipes'][name]['max_rel_diff']:.3g} after "
                  f"{args.steps} steps (ours vs {reference}; the reference moved the weights by {moved:.3g})")
        worst = max(r["max_rel_diff"] for r in result["recipes"].values())
        # A reference that did not move the weights would make any comparison pass.
        moved = min(r["reference_moved"] for r in result["recipes"].values())
        result.update(max_rel_diff=worst, passed=worst <= args.tolerance and moved > 0)
        exit_code = 0 if result["passed"] else 1
        print(f"{'PASS' if result['passed'] else 'FAIL'}: worst {worst:.3g} vs tolerance {args.tolerance:g}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
