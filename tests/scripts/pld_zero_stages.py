"""Run on 2 ranks by tests/test_pld.py: PLD training under ZeRO stages 0-3 (and 2 with activation checkpointing),
plus a negative control: stage 3 in plain DeepSpeed's per-layer layout (no encoder leaf, PLD's driver attached by
hand), whose weights must then differ from stage 0's. Rank 0 writes what every rank saw to the JSON file given as
argv[1]."""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

import ds_pld
from ds_pld.algorithms import ProgressiveLayerDropping
from ds_pld.compat import cpu_multi_rank_problem
from ds_pld.config_errors import ConfigError
from ds_pld.models import build_model
from ds_pld.pld import ProgressiveLayerDrop
from ds_pld.training.distributed import init_distributed, shutdown_distributed

VOCAB, SEQ, STEPS = 64, 16, 6


def run(stage: int, checkpointing: bool, reference: torch.Tensor | None, clear_zero3: bool = True
        ) -> tuple[dict, torch.Tensor]:
    """Train STEPS steps; return what was seen and the final weights (flat, gathered under ZeRO-3)."""
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=VOCAB, num_layers=4, hidden_dropout=0.0, attention_dropout=0.0,
                        gradient_checkpointing=checkpointing)
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": stage},
        "progressive_layer_drop": {"enabled": True, "theta": 0.5, "gamma": 0.5, "seed": 7},
    }
    if clear_zero3:
        engine, *_ = ds_pld.initialize(model=model, config=config)
        pld = ds_pld.plugin_of(engine).pld
    else:  # the negative control: plain DeepSpeed's per-layer ZeRO-3 layout (no encoder leaf), the same PLD driver
        # attached by hand; dropped layers then keep the previous step's gradient partitions
        del config["progressive_layer_drop"]
        engine, *_ = deepspeed.initialize(model=model, config=config)
        pld = ProgressiveLayerDropping(ProgressiveLayerDrop(theta=0.5, gamma=0.5, seed=7))
        pld.attach(engine)
    ran_per_pass: list[list[int]] = []
    counts = [0] * len(model.encoder.layers)
    for index, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    losses, thetas = [], []
    for _ in range(STEPS):
        for _ in range(engine.gradient_accumulation_steps()):
            ids = torch.randint(5, VOCAB, (2, SEQ), generator=generator)
            labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.3, ids, -100)
            thetas.append(pld.current_theta)
            before = list(counts)
            out = engine(ids, labels=labels)
            ran_per_pass.append([c - b for c, b in zip(counts, before)])
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
    all_ran = [None] * dist.get_world_size()
    dist.all_gather_object(all_ran, ran_per_pass)
    params = [p for p in engine.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = torch.cat([p.detach().double().reshape(-1).cpu() for p in params])
    checksum = float(weights.sum())
    checksums = [None] * dist.get_world_size()
    dist.all_gather_object(checksums, checksum)
    diff = None if reference is None else float((weights - reference).abs().max())
    engine.destroy()
    return {"stage": stage, "checkpointing": checkpointing, "cleared": clear_zero3, "losses": losses,
            "thetas": thetas, "ran": all_ran, "checksums": checksums, "global_steps": engine.global_steps,
            "max_weight_diff_vs_stage0": diff}, weights


def run_unless_refused(stage: int, checkpointing: bool, reference: torch.Tensor, clear_zero3: bool) -> dict:
    """run's result, or what ds_pld refuses on this DeepSpeed (ds_pld.compat); the negative control, plain
    DeepSpeed, is skipped where ds_pld would refuse its ZeRO-3."""
    try:
        if not clear_zero3 and dist.get_world_size() > 1 and get_accelerator().device_name() == "cpu":
            problem = cpu_multi_rank_problem(deepspeed.__version__, 3, "DeepSpeedZeroOptimizer_Stage3")
            if problem:
                raise ConfigError(problem)
        return run(stage, checkpointing, reference, clear_zero3)[0]
    except ConfigError as error:
        return {"stage": stage, "checkpointing": checkpointing, "cleared": clear_zero3, "refused": str(error)}


def main() -> None:
    init_distributed()
    first, reference = run(0, False, None)
    results = [first] + [run_unless_refused(stage, checkpointing, reference, clear)
                         for stage, checkpointing, clear in ((1, False, True), (2, False, True), (3, False, True),
                                                             (2, True, True), (3, False, False))]
    if dist.get_rank() == 0:
        with open(sys.argv[-1], "w") as handle:
            json.dump(results, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main()
