"""GLUE dev evaluation over all ranks: each rank predicts an equal share, the shares are gathered, and the task's
metrics are computed on the whole split."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from datasets import Dataset
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_pld.glue.metrics import compute_metrics
from ds_pld.glue.tasks import GlueTask


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def predict(engine: DeepSpeedEngine, dataset: Dataset, collate: Callable, batch_size: int,
            regression: bool) -> np.ndarray:
    """Predictions for every example of `dataset`, in order. Each rank runs an equal share (the last shares are
    padded with repeats, which ZeRO-3 needs: every rank must run the same number of forwards), then they are
    gathered."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = len(dataset)
    share = math.ceil(size / world)
    indices = [rank + i * world for i in range(share)]
    features = dataset.remove_columns([c for c in ("label",) if c in dataset.column_names])
    was_training = engine.module.training
    engine.eval()
    mine: list[tuple[int, float]] = []
    for start in range(0, share, batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([features[i % size] for i in chunk])
        logits = engine(**to_device(batch, engine.device)).logits.float().cpu()
        values = logits.squeeze(-1) if regression else logits.argmax(-1)
        mine.extend((i, float(v)) for i, v in zip(chunk, values.tolist()) if i < size)
    engine.train(was_training)
    gathered: list[list[tuple[int, float]]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    predictions = np.empty(size, dtype=float)
    for index, value in (pair for part in gathered for pair in part):
        predictions[index] = value
    return predictions if regression else predictions.astype(int)


def evaluate(engine: DeepSpeedEngine, task: GlueTask, dev: Mapping[str, Dataset], collate: Callable,
             batch_size: int) -> dict[str, dict[str, float]]:
    """GLUE metrics of every dev entry (`rte`, or `mnli-m` and `mnli-mm`)."""
    out = {}
    for name, dataset in dev.items():
        predictions = predict(engine, dataset, collate, batch_size, task.is_regression)
        out[task.entry_name(name)] = compute_metrics(task, predictions, dataset["label"])
    return out
