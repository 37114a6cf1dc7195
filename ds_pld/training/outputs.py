"""What a pretraining run writes: the metrics record of each step (metrics.jsonl, W&B), checkpoints, and at the end
final/ (model + tokenizer), curves.png and summary.json. Nothing is written from the weights of a diverged step."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist

from ds_pld.checkpoints import prune_checkpoints
from ds_pld.models import BertForPreTraining
from ds_pld.models.io import save_pretrained
from ds_pld.optim.moments import full_precision_state
from ds_pld.pld import theta_at
from ds_pld.training.metrics import plot_metrics, write_json
from ds_pld.training.run import PretrainingRun


def log(run: PretrainingRun, record: dict[str, Any]) -> None:
    if run.metrics is not None:
        run.metrics.write(record)
    run.tracker.log(record, step=record["step"])


def _refuse_if_diverged(run: PretrainingRun, what: str) -> None:
    if run.diverged_at is not None:
        raise RuntimeError(f"not writing {what}: training diverged at step {run.diverged_at}")


def save_checkpoint(run: PretrainingRun) -> None:
    """A checkpoint, then remove complete ones beyond `training.keep_checkpoints`."""
    _refuse_if_diverged(run, "a checkpoint")
    run.engine.save_checkpoint(str(run.checkpoint_dir))
    if run.rank == 0:
        prune_checkpoints(run.checkpoint_dir, run.config.training.keep_checkpoints)


def _save_final(run: PretrainingRun, weights: dict[str, torch.Tensor], final: Path) -> None:
    """final/ written whole or not at all (a temporary folder renamed into place)."""
    bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise RuntimeError(f"not writing final/: the weights {bad[:3]} are not finite")
    model = BertForPreTraining(run.engine.module.config)
    model.load_state_dict(weights)
    tmp = run.output_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, run.data.tokenizer)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def finish(run: PretrainingRun) -> Path | None:
    """Write final/, the curves PNG and summary.json (its last write: a resume finds the run complete), close the
    trackers and release the run folder. Returns final/ on rank 0."""
    final = run.output_dir / "final"
    _refuse_if_diverged(run, "final/")
    weights = full_precision_state(run.engine.module)  # a collective under ZeRO: every rank
    if run.rank == 0:
        _save_final(run, weights, final)
        run.metrics.close()
        plot_metrics(run.metrics.path, run.output_dir / "curves.png")
        pld = run.config.pld
        write_json(run.output_dir / "summary.json", {
            "steps": run.step, "final_dir": str(final), "theta": run.engine.get_pld_theta(),
            "theta_expected": theta_at(run.step, pld.theta, pld.gamma) if pld.enabled else None})
    run.tracker.finish()
    dist.barrier()
    if run.lock is not None:
        run.lock.release()
    return final if run.rank == 0 else None
