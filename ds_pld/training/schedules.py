"""Learning-rate schedules from the `lr_schedule` block, as LambdaLR multipliers of the optimizer's peak lr."""
from __future__ import annotations

import functools

import torch
from torch.optim.lr_scheduler import LambdaLR

from ds_pld.training.config import LRScheduleConfig


def lr_multiplier(step: int, config: LRScheduleConfig, total_steps: int) -> float:
    """Fraction of the peak lr at optimizer step `step` (0-based)."""
    warmup = int(config.warmup_proportion * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.type == "warmup_exp_decay":
        return config.decay_rate ** ((step - warmup) / config.decay_steps)
    if config.type == "warmup_linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: LRScheduleConfig, total_steps: int,
                       start_step: int = 0) -> LambdaLR:
    """A LambdaLR (its state goes into DeepSpeed checkpoints); `start_step` positions it for an engine rebuilt
    mid-run (EarlyBERT's draw): torch's own resume path (`last_epoch`, with each group's `initial_lr` = its peak)
    sets the groups' learning rate for that step, and the step count stays absolute in its checkpoints."""
    multiplier = functools.partial(lr_multiplier, config=config, total_steps=total_steps)
    if not start_step:
        return LambdaLR(optimizer, multiplier)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, multiplier, last_epoch=start_step - 1)
