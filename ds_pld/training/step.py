"""One pretraining step: the micro-batches of its data position through the algorithms' step, one all-reduce for
loss, stop request and divergence, the metrics record, and STEP_END (the divergence check first)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from deepspeed import comm as dist

from ds_pld.algorithms import Event, optimizer_step, run_event
from ds_pld.timing import StepTimer
from ds_pld.training.inputs import derived_seed, masked_batch
from ds_pld.training.run import PretrainingRun


def micro_batches(run: PretrainingRun, position: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of data position `position`, each with dropout seeded by its position (resumes replay)."""
    for micro in range(run.accumulation):
        torch.manual_seed(derived_seed(run.seed, position, micro, run.rank))
        yield masked_batch(run.masker, run.batches.examples(position, micro), run.batches.mask_seed(position, micro),
                           run.engine.device)


def optimizer_stats(engine: Any) -> dict[str, float]:
    """LAMB's trust-ratio statistics of the step, when the optimizer keeps them."""
    for optimizer in (engine.optimizer, getattr(engine.optimizer, "optimizer", None)):
        stats = getattr(optimizer, "trust_ratio_stats", None)
        if stats:
            return {f"trust_ratio_{key}": float(value) for key, value in stats.items()}
    return {}


def train_step(run: PretrainingRun, stop_requested: bool = False) -> tuple[dict[str, Any], bool]:
    """One optimizer step; returns its metrics record (also `run.state.record`) and whether any rank asked to stop
    (decided together, so every rank stops at the same step; also `run.state.stopping`). Raises TrainingDiverged,
    on every rank, when the step is not finite."""
    state = run.state
    position = run.step + run.guard.state.data_offset  # the data read at this step (rollbacks skip batches)
    timer = StepTimer(run.engine.device).start()  # waits for work queued before the step (evaluation, saves)
    run.engine.module.train()
    result = optimizer_step(state, run.events, micro_batches(run, position))
    device = run.engine.device
    shared = torch.stack([result.mean_loss, torch.tensor(float(stop_requested), device=device),
                          run.guard.flag(run.engine, result.loss_sum)])
    dist.all_reduce(shared)  # one sync per step: loss, stop request and divergence together
    loss, stop, diverged = shared.tolist()
    elapsed = timer.stop()  # after a device-wide sync: side streams (ZeRO's) included
    samples = run.micro_batch * run.accumulation * run.world_size
    state.stopping = stop > 0
    state.record = {
        "step": run.step, "loss": loss / run.world_size, "lr": float(run.engine.get_lr()[0]),
        "layers_run": result.layers_run / run.accumulation, "samples_per_sec": samples / elapsed,
        "tokens_per_sec": samples * run.data.max_seq_length / elapsed, "step_time": elapsed,
        "epoch": run.batches.epoch(position), **optimizer_stats(run.engine), "non_finite": diverged}
    run_event(run.events, Event.STEP_END, state)
    return state.record, state.stopping
