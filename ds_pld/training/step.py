"""One pretraining step: the micro-batches of its data position through the algorithms' step, one all-reduce for
loss, stop request and divergence, and the metrics record."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from deepspeed import comm as dist

from ds_pld.algorithms import Event, optimizer_step, run_event
from ds_pld.training.divergence import TrainingDiverged, latest_checkpoint, non_finite
from ds_pld.training.run import PretrainingRun


def derived_seed(*parts: int) -> int:
    """A seed that depends only on its parts (position in training), so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def masked_batch(run: PretrainingRun, rows: torch.Tensor, mask_seed: int) -> dict[str, torch.Tensor]:
    """MLM-masked rows on the engine's device."""
    batch = run.masker(rows, seed=mask_seed)
    if bool(batch["attention_mask"].all()):
        del batch["attention_mask"]  # packed sequences: no mask lets SDPA pick its fastest kernel
    return {key: value.to(run.engine.device) for key, value in batch.items()}


def micro_batches(run: PretrainingRun, position: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of data position `position`, each with dropout seeded by its position (resumes replay)."""
    for micro in range(run.accumulation):
        torch.manual_seed(derived_seed(run.seed, position, micro, run.rank))
        yield masked_batch(run, run.batches.examples(position, micro), run.batches.mask_seed(position, micro))


def optimizer_stats(engine: Any) -> dict[str, float]:
    """LAMB's trust-ratio statistics of the step, when the optimizer keeps them."""
    for optimizer in (engine.optimizer, getattr(engine.optimizer, "optimizer", None)):
        stats = getattr(optimizer, "trust_ratio_stats", None)
        if stats:
            return {f"trust_ratio_{key}": float(value) for key, value in stats.items()}
    return {}


def train_step(run: PretrainingRun, stop_requested: bool = False) -> tuple[dict[str, Any], bool]:
    """One optimizer step; returns its metrics record and whether any rank asked to stop (decided together, so
    every rank stops at the same step). Raises TrainingDiverged, on every rank, when the step is not finite."""
    position = run.step + run.divergence.data_offset  # the data read at this step (rollbacks skip batches)
    started = time.perf_counter()
    run.engine.module.train()
    result = optimizer_step(run.state, run.algorithms, micro_batches(run, position))
    device = run.engine.device
    shared = torch.stack([result.mean_loss, torch.tensor(float(stop_requested), device=device),
                          non_finite(run.engine, result.loss_sum)])
    dist.all_reduce(shared)  # one sync per step: loss, stop request and divergence together
    loss, stop, diverged = shared.tolist()  # the host waits for the device here: the clock is read after it
    elapsed = time.perf_counter() - started
    samples = run.micro_batch * run.accumulation * run.world_size
    record: dict[str, Any] = {
        "step": run.step, "loss": loss / run.world_size, "lr": float(run.engine.get_lr()[0]),
        "layers_run": result.layers_run / run.accumulation, "samples_per_sec": samples / elapsed,
        "tokens_per_sec": samples * run.data.max_seq_length / elapsed, "step_time": elapsed,
        "epoch": run.batches.epoch(position), **optimizer_stats(run.engine)}
    if diverged > 0:
        run.diverged_at = run.step
        raise TrainingDiverged(run.step, record, latest_checkpoint(run.checkpoint_dir))
    record.update(run_event(run.algorithms, Event.STEP_END, run.state))
    return record, stop > 0
