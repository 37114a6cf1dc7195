"""The resume contract: which checkpoint a `--resume` continues from, and what it refuses (nothing left to train,
another world size) or re-plans (the learning-rate schedule when max_steps changed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ds_pld.checkpoints import resolve_checkpoint
from ds_pld.config_errors import ConfigError
from ds_pld.models.config import InitFrom


def print0(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[ds_pld] {message}", flush=True)


def finished_at(output_dir: Path) -> int | None:
    """The step of the last complete run end (summary.json is its last write), if any."""
    try:
        return int(json.loads((output_dir / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_point(checkpoint_dir: Path, resume: bool, rank: int) -> dict[str, Any] | None:
    """The intact checkpoint to resume from (a fallback is announced with the bad file named), or None."""
    if not resume:
        return None
    meta, warning = resolve_checkpoint(checkpoint_dir)
    if warning is not None:
        print0(rank, f"WARNING: {warning}")
    return meta


def check_resume(meta: dict[str, Any], checkpoint_dir: Path, max_steps: int, world_size: int, rank: int,
                 replan_schedule: bool, allow_world_size_change: bool) -> int:
    """Refuse what cannot continue as it started; return the number of steps the LR schedule is planned for."""
    step = int(meta["global_steps"])
    where = f"checkpoint {str(checkpoint_dir / meta['tag'])!r}"
    if max_steps < step or max_steps == step and finished_at(checkpoint_dir.parent) == step:
        raise ConfigError(f"max_steps = {max_steps} is at or below the step of {where} ({step}): nothing is left "
                          f"to train; give --max_steps above {step}")
    if max_steps == step:  # stopped (or killed) between its last checkpoint and writing final/
        print0(rank, f"{where} is at max_steps = {step} but final/ was not written: writing it now")
    saved_world = meta.get("world_size")
    if saved_world is not None and int(saved_world) != world_size:
        if not allow_world_size_change:
            raise ConfigError(f"{where} was written by {saved_world} rank(s) and this job has {world_size}: masks "
                              "and dropout depend on the rank, so the run would not continue as it started; pass "
                              "--allow_world_size_change to resume anyway")
        print0(rank, f"WARNING: resuming {where} from {saved_world} on {world_size} rank(s) "
                     "(--allow_world_size_change): each step reads the same sequences (same global batch), but "
                     "masks and dropout differ, so the loss curve will differ from an uninterrupted run")
    planned = int(meta.get("schedule_steps", max_steps))
    if planned == max_steps:
        return planned
    if replan_schedule:
        print0(rank, f"WARNING: re-planning the learning-rate schedule for max_steps = {max_steps} (it was planned "
                     f"for {planned}; --replan_schedule): the learning rate jumps at step {step + 1}")
        return max_steps
    print0(rank, f"max_steps changed from {planned} to {max_steps}: keeping the learning-rate schedule planned for "
                 f"{planned} steps (--replan_schedule re-plans it)")
    return planned


def check_resumed_init(meta: dict[str, Any], init_from: InitFrom | None, checkpoint_dir: Path, rank: int) -> None:
    """A resume continues its own checkpoint and never re-applies `model.init_from` (job scripts pass --resume on
    every start, so the first start of a run initializes and every later one resumes). An `init_from` that is not
    the one the run was started from means another run folder was meant: refused."""
    if init_from is None:
        return
    where = f"checkpoint {str(checkpoint_dir / meta['tag'])!r}"
    wanted = str(Path(init_from.path).resolve())
    if "init_from" in meta and meta["init_from"] != wanted:
        started = "from random weights" if meta["init_from"] is None else f"from '{meta['init_from']}'"
        raise ConfigError(f"--resume found {where} of a run started {started}, but 'model.init_from' = "
                          f"'{init_from.path}': a resume continues its own checkpoint and never re-initializes; "
                          "drop --init_from to resume it, or give a fresh --output_dir to start from the model")
    print0(rank, f"resuming {where}: 'model.init_from' applies to the run's first start only and is not applied "
                 "again")
