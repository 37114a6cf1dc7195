"""What a pretraining run writes, as callbacks: `MetricsLog` (each step's record to metrics.jsonl and W&B) and
`Checkpointing` (checkpoints every `checkpoint_every` steps and at a stop; at the end final/ (model + tokenizer),
curves.png and summary.json). Nothing is written from the weights of a diverged step."""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist

import ds_pld
from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.checkpoints import prune_checkpoints
from ds_pld.models import BertForPreTraining
from ds_pld.models.io import save_pretrained
from ds_pld.optim.moments import full_precision_state
from ds_pld.pld import PLDConfig, theta_at
from ds_pld.plugin_state import plugin_of
from ds_pld.training.config import TrainingConfig, WandbConfig
from ds_pld.training.divergence import DivergenceGuard
from ds_pld.training.lock import RunFolderLock
from ds_pld.training.metrics import MetricsFile, plot_metrics, read_metrics, write_json
from ds_pld.training.tracking import WandbTracker


class MetricsLog(Algorithm):
    """AFTER_STEP: the step's record into `<output_dir>/metrics.jsonl` (rank 0) and W&B. A resumed run drops the
    lines after its checkpoint and gives W&B again what its previous start may not have sent."""

    name = "metrics_log"

    def __init__(self, output_dir: Path, rank: int, wandb: WandbConfig, run_config: Mapping[str, Any],
                 resumed_from: int | None):
        self.output_dir = output_dir
        self.file = MetricsFile(output_dir / "metrics.jsonl", resumed_from) if rank == 0 else None
        self.tracker = WandbTracker(wandb, output_dir, rank, run_config, resumed_from is not None)
        if self.file is not None and resumed_from is not None:
            self.tracker.replay(read_metrics(self.file.path), resumed_from)

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.AFTER_STEP, Event.FIT_END)

    def apply(self, event: Event, state: State) -> Metrics | None:
        if event is Event.AFTER_STEP:
            self.write(state.record)
        else:
            self.close()
        return None

    def write(self, record: Mapping[str, Any]) -> None:
        if self.file is not None:
            self.file.write(record)
        self.tracker.log(record, step=record["step"])

    def rewind(self, step: int) -> None:
        """Drop the lines after `step` (a divergence rollback re-trains those steps)."""
        if self.file is not None:
            self.file.rewind(step)

    def close(self) -> None:
        """metrics.jsonl closed and charted (curves.png); the W&B run finished."""
        if self.file is not None:
            self.file.close()
            plot_metrics(self.file.path, self.output_dir / "curves.png")
        self.tracker.finish()


class Checkpointing(Algorithm):
    """AFTER_STEP: a checkpoint every `checkpoint_every` steps, at the last step and when the loop stops, then the
    complete ones beyond `keep_checkpoints` removed. FIT_END: final/, summary.json (its last write: a resume finds
    the run complete) and the run folder's lock released."""

    name = "checkpointing"

    def __init__(self, output_dir: Path, checkpoint_dir: Path, rank: int, training: TrainingConfig, pld: PLDConfig,
                 guard: DivergenceGuard, tokenizer: Any, lock: RunFolderLock | None):
        self.output_dir, self.checkpoint_dir, self.rank = output_dir, checkpoint_dir, rank
        self.training, self.pld, self.guard, self.tokenizer, self.lock = training, pld, guard, tokenizer, lock
        self.final_dir: Path | None = None  # set at FIT_END on rank 0

    def match(self, event: Event, state: State) -> bool:
        if event is Event.FIT_END:
            return True
        step = state.step
        return event is Event.AFTER_STEP and (state.stopping or step % self.training.checkpoint_every == 0 or
                                              step == self.training.max_steps)

    def apply(self, event: Event, state: State) -> Metrics | None:
        if event is Event.AFTER_STEP:
            self.save(state)
        else:
            self.finish(state)
        return None

    def save(self, state: State) -> None:
        self.guard.refuse_if_diverged("a checkpoint")
        ds_pld.save_checkpoint(state.engine, self.checkpoint_dir)
        if self.rank == 0:
            prune_checkpoints(self.checkpoint_dir, self.training.keep_checkpoints)

    def finish(self, state: State) -> None:
        final = self.output_dir / "final"
        self.guard.refuse_if_diverged("final/")
        weights = full_precision_state(state.model)  # a collective under ZeRO: every rank
        if self.rank == 0:
            self._save_final(state, weights, final)
            expected = theta_at(state.step + self.pld.start_step, self.pld.theta, self.pld.gamma)
            write_json(self.output_dir / "summary.json", {
                "steps": state.step, "final_dir": str(final), "theta": plugin_of(state.engine).pld_theta(),
                "theta_expected": expected if self.pld.enabled else None})
            self.final_dir = final
        dist.barrier()
        self.release()

    def release(self) -> None:
        """Release the run folder (at the end, or when a study gives a diverged run up)."""
        if self.lock is not None:
            self.lock.release()

    def _save_final(self, state: State, weights: dict[str, torch.Tensor], final: Path) -> None:
        """final/ written whole or not at all (a temporary folder renamed into place)."""
        bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
        if bad:
            raise RuntimeError(f"not writing final/: the weights {bad[:3]} are not finite")
        model = BertForPreTraining(state.model.config)
        model.load_state_dict(weights)
        tmp = self.output_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, self.tokenizer)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
