"""Divergence: the per-step check that the loss and gradient norm are finite, and `training.on_divergence =
"rollback"`: back to the last good checkpoint, skipping the batches read since and lowering the learning rate."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ds_pld.checkpoints import resolve_checkpoint
from ds_pld.config_errors import ConfigError
from ds_pld.engine import DsPldEngine
from ds_pld.training.resume import print0

if TYPE_CHECKING:
    from ds_pld.training.run import PretrainingRun

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.data_offset = int(state["rollbacks"]), int(state["data_offset"])
        self.lr_scale = float(state["lr_scale"])


def non_finite(engine: DsPldEngine, loss_sum: torch.Tensor) -> torch.Tensor:
    """1.0 (on the device, no host sync) if this rank's loss or the step's gradient norm is NaN or infinite. Under
    fp16 an infinite gradient norm is the loss scaler's skipped step, not a divergence."""
    bad = ~torch.isfinite(loss_sum)
    norm = None if engine.fp16_enabled() else engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        bad = bad | ~torch.isfinite(norm.detach().to(bad.device)).all()
    elif isinstance(norm, (int, float)) and not math.isfinite(norm):
        bad = torch.ones_like(bad)
    return bad.float()


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    try:
        return str(checkpoint_dir / (checkpoint_dir / "latest").read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None


def scale_lr(engine: DsPldEngine, factor: float) -> None:
    """Scale the learning rate now and for the rest of the schedule (a torch scheduler's base_lrs are in its
    checkpointed state, so a resumed run keeps the scale)."""
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in engine.optimizer.param_groups:
        group["lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]


def roll_back(run: PretrainingRun) -> str:
    """Reload the last good checkpoint, skip the batches read since it (through the diverged step), scale the
    learning rate by `rollback_lr_factor`; returns what was done. Raises CannotRollBack when the policy is "stop",
    `max_rollbacks` are used up, there is no checkpoint, or EarlyBERT pruned the model after it. Every rank takes
    the same decision (same checkpoint folder, same state)."""
    cfg, diverged, state = run.config.training, run.diverged_at, run.divergence
    if diverged is None:
        raise CannotRollBack("training has not diverged")
    if cfg.on_divergence != "rollback":
        raise CannotRollBack("training.on_divergence is 'stop'")
    if state.rollbacks >= cfg.max_rollbacks:
        raise CannotRollBack(f"training.max_rollbacks = {cfg.max_rollbacks} rollback(s) already done")
    try:
        meta, warning = resolve_checkpoint(run.checkpoint_dir)
    except ConfigError as err:
        raise CannotRollBack(str(err)) from None
    if meta is None:
        raise CannotRollBack("no checkpoint was saved before the divergence")
    if meta.get("model_config") != run.engine.module.config.to_dict():
        raise CannotRollBack(f"the model changed (EarlyBERT pruned it) after checkpoint {meta['tag']!r}")
    if warning is not None:
        print0(run.rank, f"WARNING: {warning}")
    back_to = int(meta["global_steps"])
    wanted = DivergenceState(state.rollbacks + 1, state.data_offset + diverged - back_to,
                             state.lr_scale * cfg.rollback_lr_factor)
    run.engine.load_checkpoint(str(run.checkpoint_dir), tag=meta["tag"])  # restores the saved state too
    scale_lr(run.engine, wanted.lr_scale / state.lr_scale)
    state.load_state_dict(wanted.state_dict())
    run.engine._global_grad_norm = None  # the diverged step's NaN norm must not be read again
    run.diverged_at = None
    if run.metrics is not None:
        run.metrics.rewind(back_to)
    return (f"rolled back to step {back_to} (rollback {wanted.rollbacks} of {cfg.max_rollbacks}): skipping the "
            f"batches of steps {back_to + 1}-{diverged}, learning rate x{wanted.lr_scale:g} of the plan")
