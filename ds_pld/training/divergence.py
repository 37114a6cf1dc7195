"""Divergence: the per-step check that the loss and gradient norm are finite (a callback, `DivergenceGuard`, shared by
pretraining and GLUE), and `training.on_divergence = "rollback"`: back to the last good checkpoint, skipping the
batches read since and lowering the learning rate."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

import ds_pld
from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.checkpoints import resolve_checkpoint
from ds_pld.config_errors import ConfigError
from ds_pld.plugin_state import plugin_of
from ds_pld.training.config import TrainingConfig
from ds_pld.training.resume import print0

DIVERGENCE_STATE = "divergence"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step is not finite on some rank; every rank raises it at the same step
    (the check rides on the step's all-reduce). `record` is that step's metrics record (loss null if not finite)."""

    def __init__(self, step: int, record: dict[str, Any], last_checkpoint: str | None):
        self.step, self.record = step, record
        after = f"the last good checkpoint is {last_checkpoint!r}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(f"training diverged at step {step}: the loss or the gradient norm is not finite "
                         f"(loss {record.get('loss')}); no checkpoint, 'latest' or final/ is written from these "
                         f"weights; {after}. Lower the learning rate (or raise warmup) and resume with --resume")


class CannotRollBack(RuntimeError):
    """`training.on_divergence = "rollback"` found no way back (policy, limit, no checkpoint, model changed)."""


@dataclasses.dataclass
class DivergenceState:
    """What divergence rollbacks changed, saved in every checkpoint so a resumed run continues with it: how many
    there were, how many batches were skipped (the data position is step + data_offset) and the lr scale."""

    rollbacks: int = 0
    data_offset: int = 0
    lr_scale: float = 1.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks, self.data_offset = int(state["rollbacks"]), int(state["data_offset"])
        self.lr_scale = float(state["lr_scale"])


def non_finite(engine: DeepSpeedEngine, loss_sum: torch.Tensor) -> torch.Tensor:
    """1.0 (on the device, no host sync) if this rank's loss or the step's gradient norm is NaN or infinite. Under
    fp16 an infinite gradient norm is the loss scaler's skipped step, not a divergence."""
    bad = ~torch.isfinite(loss_sum)
    norm = None if engine.fp16_enabled() else plugin_of(engine).global_grad_norm()
    if isinstance(norm, torch.Tensor):
        bad = bad | ~torch.isfinite(norm.detach().to(bad.device)).all()
    elif isinstance(norm, (int, float)) and not math.isfinite(norm):
        bad = torch.ones_like(bad)
    return bad.float()


def latest_checkpoint(checkpoint_dir: Path | None) -> str | None:
    if checkpoint_dir is None:
        return None
    try:
        return str(checkpoint_dir / (checkpoint_dir / "latest").read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None


def scale_lr(engine: DeepSpeedEngine, factor: float) -> None:
    """Scale the learning rate now and for the rest of the schedule (a torch scheduler's base_lrs are in its
    checkpointed state, so a resumed run keeps the scale). The scheduler's `get_last_lr()` shows the scale from its
    next step on; the engine's `get_lr()` reads the optimizer and shows it at once."""
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in engine.optimizer.param_groups:
        group["lr"] *= factor


class DivergenceGuard(Algorithm):
    """The divergence check as a callback. `flag(engine, loss_sum)` is the device-side test the loop all-reduces
    with its other per-step numbers into `state.record["non_finite"]`; at STEP_END (first in the event list, before
    a speed-up may act on the step) a non-zero value raises TrainingDiverged on every rank. With a `training`
    config and a checkpoint folder, `roll_back` can take the run back; its state (rollbacks, skipped batches, lr
    scale) travels in the checkpoints."""

    name = "divergence"

    def __init__(self, training: TrainingConfig | None = None, checkpoint_dir: Path | None = None, rank: int = 0):
        self.training = training
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.state = DivergenceState()
        self.diverged_at: int | None = None

    @staticmethod
    def flag(engine: DeepSpeedEngine, loss_sum: torch.Tensor) -> torch.Tensor:
        return non_finite(engine, loss_sum)

    def match(self, event: Event, state: State) -> bool:
        return event is Event.STEP_END

    def apply(self, event: Event, state: State) -> Metrics | None:
        if state.record.pop("non_finite", 0.0) > 0:
            self.diverged_at = state.step
            raise TrainingDiverged(state.step, state.record, latest_checkpoint(self.checkpoint_dir))
        return None

    def refuse_if_diverged(self, what: str) -> None:
        if self.diverged_at is not None:
            raise RuntimeError(f"not writing {what}: training diverged at step {self.diverged_at}")

    def roll_back(self, state: State, rewind_metrics: Callable[[int], None] | None = None) -> str:
        """Reload the last good checkpoint, skip the batches read since it (through the diverged step), scale the
        learning rate by `rollback_lr_factor`; returns what was done. Raises CannotRollBack when the policy is
        "stop", `max_rollbacks` are used up, there is no checkpoint, or EarlyBERT pruned the model after it. Every
        rank takes the same decision (same checkpoint folder, same state)."""
        cfg, diverged, current = self.training, self.diverged_at, self.state
        if diverged is None:
            raise CannotRollBack("training has not diverged")
        if cfg is None or self.checkpoint_dir is None or cfg.on_divergence != "rollback":
            raise CannotRollBack("training.on_divergence is 'stop'")
        if current.rollbacks >= cfg.max_rollbacks:
            raise CannotRollBack(f"training.max_rollbacks = {cfg.max_rollbacks} rollback(s) already done")
        try:
            meta, warning = resolve_checkpoint(self.checkpoint_dir)
        except ConfigError as err:
            raise CannotRollBack(str(err)) from None
        if meta is None:
            raise CannotRollBack("no checkpoint was saved before the divergence")
        if meta.get("model_config") != state.model.config.to_dict():
            raise CannotRollBack(f"the model changed (EarlyBERT pruned it) after checkpoint {meta['tag']!r}")
        if warning is not None:
            print0(self.rank, f"WARNING: {warning}")
        back_to = int(meta["global_steps"])
        wanted = DivergenceState(current.rollbacks + 1, current.data_offset + diverged - back_to,
                                 current.lr_scale * cfg.rollback_lr_factor)
        ds_pld.load_checkpoint(state.engine, self.checkpoint_dir, tag=meta["tag"])  # restores this state too
        scale_lr(state.engine, wanted.lr_scale / self.state.lr_scale)
        self.state.load_state_dict(wanted.state_dict())
        self.diverged_at = None
        if rewind_metrics is not None:
            rewind_metrics(back_to)
        return (f"rolled back to step {back_to} (rollback {wanted.rollbacks} of {cfg.max_rollbacks}): skipping the "
                f"batches of steps {back_to + 1}-{diverged}, learning rate x{wanted.lr_scale:g} of the plan")

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.load_state_dict(state)
