"""One GLUE run's optimization: its DeepSpeed config (the glue block's batch size, learning rate and weight decay),
its number of steps, and the engine with transformers' linear warmup-decay schedule.

AdamW unless the file names another optimizer; weight decay off by the one rule of ds_pld.optim.param_groups
(biases, norms, slimming coefficients); warmup over `warmup_ratio` of the steps, then linear decay to 0.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import ds_pld
from ds_pld.algorithms.pld import ProgressiveLayerDropping
from ds_pld.glue.config import TaskSettings
from ds_pld.optim.param_groups import weight_decay_groups
from ds_pld.training.batch_size import resolve_batch_sizes


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at optimizer step `step` (transformers' linear schedule with warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def training_steps(settings: TaskSettings, micro_batches_per_epoch: int, accumulation: int,
                   max_steps: int | None) -> int:
    """Optimizer steps of a run: `epochs` passes over the data (fractions allowed), capped by `max_steps`."""
    steps = max(1, math.ceil(settings.epochs * micro_batches_per_epoch) // accumulation)
    return min(steps, max_steps) if max_steps is not None else steps


def deepspeed_config(base: Mapping[str, Any], settings: TaskSettings, weight_decay: float,
                     world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one run: the glue block's batch size split into micro-batches x accumulation x
    ranks, and its learning rate / weight decay in the optimizer block (AdamW unless the file names another)."""
    config = copy.deepcopy(dict(base))
    config["train_batch_size"] = settings.batch_size
    resolve_batch_sizes(config, world_size, total_name="glue.batch_size")
    optimizer = copy.deepcopy(config.get("optimizer") or {"type": "AdamW"})
    optimizer["params"] = {**optimizer.get("params", {}), "lr": settings.learning_rate, "weight_decay": weight_decay}
    config["optimizer"] = optimizer
    return config


def build_engine(model: nn.Module, config: dict[str, Any], weight_decay: float, warmup: int, total: int,
                 start_step: int = 0, pld: ProgressiveLayerDropping | None = None) -> DeepSpeedEngine:
    """A DeepSpeed engine whose schedule starts at optimizer step `start_step` (non-zero after an EarlyBERT draw);
    `pld`: the run's PLD algorithm, moved onto the new engine (None: ds_pld.initialize makes one if the config
    enables PLD)."""
    def scheduler(optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: linear_warmup_decay(step + start_step, warmup, total))

    engine, *_ = ds_pld.initialize(model=model, model_parameters=weight_decay_groups(model, weight_decay),
                                   lr_scheduler=scheduler, config=config, pld=pld)
    return engine
