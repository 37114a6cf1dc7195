"""Validation during pretraining: MLM loss and accuracy on a fixed slice of the validation split with fixed masks,
so the numbers are comparable over time and across runs."""
from __future__ import annotations

import torch
from datasets import Dataset
from deepspeed import comm as dist

from ds_pld.training.run import PretrainingRun
from ds_pld.training.step import derived_seed, masked_batch

VALIDATION_STREAM = 7919  # keeps validation mask seeds apart from training's


@torch.no_grad()
def evaluate(run: PretrainingRun, dataset: Dataset | None = None, seed: int | None = None) -> dict[str, float]:
    """`training.eval_batches` micro-batches per rank, every layer run (eval mode), reduced over the ranks.

    `dataset` (default: the validation split) and `seed` (default: the run's; masks are drawn from it) let a study
    score runs of different seeds on the same masked sequences, or score a slice of the training data."""
    engine = run.engine
    validation = run.data.validation if dataset is None else dataset
    seed = run.seed if seed is None else seed
    engine.module.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for index in range(run.config.training.eval_batches):
        start = (index * run.world_size + run.rank) * run.micro_batch
        rows = torch.stack([validation[(start + i) % len(validation)]["input_ids"] for i in range(run.micro_batch)])
        out = engine(**masked_batch(run, rows.long(), derived_seed(seed, VALIDATION_STREAM, index, run.rank)))
        count = out.masked_labels.numel()
        totals += torch.tensor([out.loss.double().item() * count,
                                (out.logits.argmax(-1) == out.masked_labels).sum().item(), count],
                               dtype=torch.float64)
    totals = totals.to(engine.device)
    dist.all_reduce(totals)
    engine.module.train()
    return {"val_loss": float(totals[0] / totals[2].clamp(min=1)),
            "val_accuracy": float(totals[1] / totals[2].clamp(min=1))}
