"""Everything `launch/train.py` needs, so its loop fits on one screen: data, model, engine, resume, one training
step, validation, checkpoints, EarlyBERT's draw, metrics and tracking."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed import comm as dist

import ds_pld
from ds_pld.config import DsPldConfig
from ds_pld.config_errors import ConfigError
from ds_pld.data import MLMMasker, StepBatches, check_seq_length, load_pretraining_data, prepare_dataset
from ds_pld.earlybert import EarlyBird, prune_model, validate_for_model
from ds_pld.earlybert.prune import prune_adam_moments
from ds_pld.engine import DsPldEngine, prune_checkpoints, resolve_checkpoint
from ds_pld.models import BertForPreTraining, build_bert_config
from ds_pld.models.io import save_pretrained
from ds_pld.optim.moments import read_moments, write_moments
from ds_pld.pld import expected_layers, theta_at
from ds_pld.training.lock import RunFolderBusy, RunFolderLock
from ds_pld.training.metrics import MetricsFile, plot_metrics, read_metrics
from ds_pld.training.schedules import build_lr_scheduler
from ds_pld.training.tracking import WandbTracker

CHECKPOINT_DIR = "checkpoints"
EARLYBERT_STATE = "earlybert"
DIVERGENCE_STATE = "divergence"


def resolve_batch_sizes(ds_config: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps), checked against the world size before DeepSpeed sees
    the config; the resolved triple is written back so DeepSpeed agrees."""
    total = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    for key, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", accum)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"'{key}' = {value!r} must be a positive integer")
    if micro is None and accum is None:
        if total is None:
            raise ConfigError("the config sets none of 'train_batch_size', 'train_micro_batch_size_per_gpu'")
        accum = 1
    if micro is None:
        micro, rest = divmod(total, accum * world_size)
        if rest or micro < 1:
            raise ConfigError(f"'train_batch_size' = {total} cannot be split over {world_size} rank(s) x "
                              f"'gradient_accumulation_steps' = {accum}")
    if accum is None:
        accum = 1 if total is None else total // (micro * world_size)
        if total is not None and (accum < 1 or accum * micro * world_size != total):
            raise ConfigError(f"'train_batch_size' = {total} is not a multiple of 'train_micro_batch_size_per_gpu' "
                              f"= {micro} x {world_size} rank(s)")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(f"'train_batch_size' = {total} != 'train_micro_batch_size_per_gpu' {micro} x "
                          f"'gradient_accumulation_steps' {accum} x {world_size} rank(s)")
    ds_config.update(train_batch_size=micro * accum * world_size, train_micro_batch_size_per_gpu=micro,
                     gradient_accumulation_steps=accum)
    return micro, accum


NO_DECAY = ("bias", "norm", "_coef")


def parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """BERT recipes exempt biases, LayerNorm weights (and slimming coefficients) from weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if any(part in name for part in NO_DECAY) else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def derived_seed(*parts: int) -> int:
    """A seed that depends only on its parts (position in training), so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def full_fp32_state_dict(engine: DsPldEngine) -> dict[str, torch.Tensor]:
    """The model's weights as the optimizer holds them (fp32 masters, gathered under ZeRO-3), on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param) if engine.zero_optimization_stage() or engine.bfloat16_enabled() \
            else None
        state[name] = (param if master is None else master).detach().float().cpu().clone()
    return state


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


def _print0(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[ds_pld] {message}", flush=True)


class PretrainingRun:
    """One pretraining job on this rank. Build with `build_run(config, output_dir, resume)`."""

    def __init__(self, config: DsPldConfig, output_dir: Path, resume: bool, replan_schedule: bool = False,
                 allow_world_size_change: bool = False):
        self.config = config
        self.output_dir = output_dir
        self.checkpoint_dir = output_dir / CHECKPOINT_DIR
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.lock = self._lock_output_dir()  # before anything in the folder is written
        self.max_steps = config.training.max_steps
        self.seed = config.training.seed
        self.diverged_at: int | None = None
        self.divergence = DivergenceState()
        self.ds_config = dict(config.deepspeed)
        try:
            self.micro_batch, self.accumulation = resolve_batch_sizes(self.ds_config, self.world_size)
        except ConfigError as err:
            raise ConfigError(f"{config.source}: {err}") from None
        meta = self._resume_point(resume)
        self.resumed_from = None if meta is None else int(meta["global_steps"])
        self.schedule_steps = self.max_steps if meta is None else \
            self._check_resume(meta, replan_schedule, allow_world_size_change)
        self.data = self._load_data()
        model_config = self._model_config(meta)
        self.bird = EarlyBird(config.earlybert) if config.earlybert is not None else None
        if self.bird is not None:
            validate_for_model(config.earlybert, model_config)
        torch.manual_seed(self.seed)
        self.engine = self._build_engine(BertForPreTraining(model_config))
        if meta is not None:
            self.engine.load_checkpoint(str(self.checkpoint_dir), tag=meta["tag"])
        self.batches = StepBatches(self.data.train, self.micro_batch, self.accumulation, self.world_size, self.rank,
                                   self.seed)
        self.masker = MLMMasker(self.data.tokenizer, config.data.mlm_probability)
        self.metrics = MetricsFile(output_dir / "metrics.jsonl", self.resumed_from) if self.rank == 0 else None
        self.tracker = WandbTracker(config.wandb, output_dir, self.rank, self._run_summary(), resume)
        if self.metrics is not None and self.resumed_from is not None:
            self.tracker.replay(read_metrics(self.metrics.path), self.resumed_from)

    # --- construction -----------------------------------------------------------------------------------------------

    def _finished_at(self) -> int | None:
        """The step of the last complete `finish()` (summary.json is its last write), if any."""
        try:
            return int(json.loads((self.output_dir / "summary.json").read_text())["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _lock_output_dir(self) -> RunFolderLock | None:
        """Rank 0 takes the run folder's lock; every rank learns the answer (one all-reduce at start-up) and a
        refused job exits on all ranks with the holder's host and pid."""
        lock = RunFolderLock(self.output_dir) if self.rank == 0 else None
        message = ""
        if lock is not None:
            try:
                lock.acquire()
            except RunFolderBusy as err:
                message = str(err)
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))
        refused = torch.tensor([float(bool(message))], device=device)
        dist.all_reduce(refused)
        if float(refused[0]) > 0:
            raise ConfigError(message or "the run folder is in use by another run (rank 0 names it)")
        return lock

    def _resume_point(self, resume: bool) -> dict[str, Any] | None:
        """The intact checkpoint to resume from (a fallback is announced with the bad file named), or None."""
        if not resume:
            return None
        meta, warning = resolve_checkpoint(self.checkpoint_dir)
        if warning is not None:
            _print0(self.rank, f"WARNING: {warning}")
        return meta

    def _check_resume(self, meta: dict[str, Any], replan_schedule: bool, allow_world_size_change: bool) -> int:
        """The resume contract; returns the number of steps the learning-rate schedule is planned for."""
        step = int(meta["global_steps"])
        where = f"checkpoint {str(self.checkpoint_dir / meta['tag'])!r}"
        if self.max_steps < step or self.max_steps == step and self._finished_at() == step:
            raise ConfigError(f"max_steps = {self.max_steps} is at or below the step of {where} ({step}): nothing "
                              f"is left to train; give --max_steps above {step}")
        if self.max_steps == step:  # stopped (or killed) between its last checkpoint and writing final/
            _print0(self.rank, f"{where} is at max_steps = {step} but final/ was not written: writing it now")
        saved_world = meta.get("world_size")
        if saved_world is not None and int(saved_world) != self.world_size:
            if not allow_world_size_change:
                raise ConfigError(f"{where} was written by {saved_world} rank(s) and this job has "
                                  f"{self.world_size}: masks and dropout depend on the rank, so the run would not "
                                  "continue as it started; pass --allow_world_size_change to resume anyway")
            _print0(self.rank, f"WARNING: resuming {where} from {saved_world} on {self.world_size} rank(s) "
                               "(--allow_world_size_change): each step reads the same sequences (same global "
                               "batch), but masks and dropout differ, so the loss curve will differ from an "
                               "uninterrupted run")
        planned = int(meta.get("schedule_steps", self.max_steps))
        if planned == self.max_steps:
            return planned
        if replan_schedule:
            _print0(self.rank, f"WARNING: re-planning the learning-rate schedule for max_steps = {self.max_steps} "
                               f"(it was planned for {planned}; --replan_schedule): the learning rate jumps at step "
                               f"{step + 1}")
            return self.max_steps
        _print0(self.rank, f"max_steps changed from {planned} to {self.max_steps}: keeping the learning-rate "
                           f"schedule planned for {planned} steps (--replan_schedule re-plans it)")
        return planned

    def _load_data(self):
        data = self.config.data
        path = Path(data.path) if data.path else self.output_dir / "data"
        if not data.path and self.rank == 0:
            prepare_dataset(path, corpus_files=list(data.corpus) or None, tokenizer=data.tokenizer,
                            max_seq_length=data.max_seq_length, vocab_size=data.vocab_size,
                            validation_fraction=data.validation_fraction, seed=self.seed,
                            encoding_errors=data.encoding_errors)
        dist.barrier()
        loaded = load_pretraining_data(path)
        if self.rank == 0:
            loaded.tokenizer.save_pretrained(str(self.output_dir / "tokenizer"))
        return loaded

    def _model_config(self, meta: dict | None):
        """The checkpoint's model config when resuming (it may be EarlyBERT-pruned), else the config's."""
        if meta is not None:
            return build_bert_config(meta["model_config"])
        spec = self.config.model or build_bert_config("bert-base")
        tokenizer = self.data.tokenizer
        overrides: dict[str, Any] = {"vocab_size": self.data.vocab_size, "pad_token_id": tokenizer.pad_token_id}
        if self.config.earlybert is not None:
            overrides["slimming"] = True
        model_config = spec.with_updates(**overrides)
        check_seq_length(self.data.max_seq_length, model_config.max_position_embeddings)
        return model_config

    def _build_engine(self, model: BertForPreTraining, start_step: int = 0) -> DsPldEngine:
        schedule = self.config.lr_schedule
        scheduler = None if schedule is None else (
            lambda optimizer: build_lr_scheduler(optimizer, schedule, self.schedule_steps, start_step))
        config = dataclasses.replace(self.config, deepspeed=self.ds_config)
        optimizer_type = str((self.ds_config.get("optimizer") or {}).get("type", "")).lower()
        groups = None if optimizer_type in ("", "lamb") else parameter_groups(model)
        engine, *_ = ds_pld.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=scheduler)
        if self.bird is not None and model.config.slimming:
            engine.extra_state[EARLYBERT_STATE] = self.bird
        engine.extra_state[DIVERGENCE_STATE] = self.divergence
        engine.checkpoint_meta.update(seed=self.seed, max_steps=self.max_steps, schedule_steps=self.schedule_steps)
        return engine

    def _run_summary(self) -> dict[str, Any]:
        return {"model": self.engine.module.config.to_dict(), "deepspeed": self.ds_config,
                "world_size": self.world_size,
                "pld": dataclasses.asdict(self.config.pld), "seed": self.seed, "max_steps": self.max_steps,
                "earlybert": None if self.config.earlybert is None else dataclasses.asdict(self.config.earlybert)}

    # --- training ---------------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.engine.global_steps

    @property
    def searching(self) -> bool:
        return self.bird is not None and self.engine.module.config.slimming

    def _batch(self, rows: torch.Tensor, mask_seed: int) -> dict[str, torch.Tensor]:
        batch = self.masker(rows, seed=mask_seed)
        if bool(batch["attention_mask"].all()):
            del batch["attention_mask"]  # packed sequences: no mask lets SDPA pick its fastest kernel
        return {key: value.to(self.engine.device) for key, value in batch.items()}

    def train_step(self, stop_requested: bool = False) -> tuple[dict[str, Any], bool]:
        """One optimizer step over all micro-batches; returns the metrics record and whether any rank asked to stop
        (decided together, so every rank stops at the same step)."""
        engine, step = self.engine, self.step
        position = step + self.divergence.data_offset  # the data read at this step (rollbacks skip batches)
        theta = engine.get_pld_theta()
        started = time.perf_counter()
        engine.module.train()
        loss_sum = torch.zeros((), device=engine.device)  # summed on the device: no sync per micro-batch
        layers_run = 0
        for micro in range(self.accumulation):
            torch.manual_seed(derived_seed(self.seed, position, micro, self.rank))  # dropout, a function of position
            batch = self._batch(self.batches.examples(position, micro), self.batches.mask_seed(position, micro))
            out = engine(**batch)
            loss = out.loss + self.bird.penalty(engine.module) if self.searching else out.loss
            engine.backward(loss)
            engine.step()
            loss_sum += out.loss.detach().float()
            layers_run += out.layers_run
        shared = torch.stack([loss_sum / self.accumulation, torch.tensor(float(stop_requested), device=engine.device),
                              self._non_finite(loss_sum)])
        dist.all_reduce(shared)  # one sync per step: loss, stop request and divergence together
        elapsed = time.perf_counter() - started
        samples = self.micro_batch * self.accumulation * self.world_size
        num_layers = engine.module.config.num_layers
        record: dict[str, Any] = {
            "step": self.step, "loss": float(shared[0]) / self.world_size, "lr": float(engine.get_lr()[0]),
            "pld_theta": theta, "expected_layers": expected_layers(theta if theta is not None else 1.0, num_layers),
            "layers_run": layers_run / self.accumulation, "samples_per_sec": samples / elapsed,
            "tokens_per_sec": samples * self.data.max_seq_length / elapsed, "step_time": elapsed,
            "epoch": self.batches.epoch(position),
        }
        record.update(self._optimizer_stats())
        if float(shared[2]) > 0:
            self.diverged_at = self.step
            raise TrainingDiverged(self.step, record, self._latest_checkpoint())
        if self.searching:
            record.update(self._earlybert_step())
        return record, float(shared[1]) > 0

    def _non_finite(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """1.0 (on the device, no host sync) if this rank's loss or the step's gradient norm is NaN or infinite.
        Under fp16 an infinite gradient norm is the loss scaler's skipped step, not a divergence."""
        bad = ~torch.isfinite(loss_sum)
        norm = None if self.engine.fp16_enabled() else self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            bad = bad | ~torch.isfinite(norm.detach().to(bad.device)).all()
        elif isinstance(norm, (int, float)) and not math.isfinite(norm):
            bad = torch.ones_like(bad)
        return bad.float()

    def roll_back(self) -> str:
        """`training.on_divergence = "rollback"`: reload the last good checkpoint, skip the batches read since it
        (through the diverged step), scale the learning rate by `rollback_lr_factor`. Raises CannotRollBack when
        the policy is "stop", `max_rollbacks` are used up, there is no checkpoint, or EarlyBERT pruned the model
        after it. Every rank takes the same decision (same checkpoint folder, same state)."""
        cfg, diverged = self.config.training, self.diverged_at
        if diverged is None:
            raise CannotRollBack("training has not diverged")
        if cfg.on_divergence != "rollback":
            raise CannotRollBack("training.on_divergence is 'stop'")
        if self.divergence.rollbacks >= cfg.max_rollbacks:
            raise CannotRollBack(f"training.max_rollbacks = {cfg.max_rollbacks} rollback(s) already done")
        try:
            meta, warning = resolve_checkpoint(self.checkpoint_dir)
        except ConfigError as err:
            raise CannotRollBack(str(err)) from None
        if meta is None:
            raise CannotRollBack("no checkpoint was saved before the divergence")
        if meta.get("model_config") != self.engine.module.config.to_dict():
            raise CannotRollBack(f"the model changed (EarlyBERT pruned it) after checkpoint {meta['tag']!r}")
        if warning is not None:
            _print0(self.rank, f"WARNING: {warning}")
        back_to = int(meta["global_steps"])
        wanted = DivergenceState(self.divergence.rollbacks + 1,
                                 self.divergence.data_offset + diverged - back_to,
                                 self.divergence.lr_scale * cfg.rollback_lr_factor)
        self.engine.load_checkpoint(str(self.checkpoint_dir), tag=meta["tag"])  # restores the saved state too
        self._scale_lr(wanted.lr_scale / self.divergence.lr_scale)
        self.divergence.load_state_dict(wanted.state_dict())
        self.engine._global_grad_norm = None  # the diverged step's NaN norm must not be read again
        self.diverged_at = None
        if self.metrics is not None:
            self.metrics.rewind(back_to)
        return (f"rolled back to step {back_to} (rollback {wanted.rollbacks} of {cfg.max_rollbacks}): skipping the "
                f"batches of steps {back_to + 1}-{diverged}, learning rate x{wanted.lr_scale:g} of the plan")

    def _scale_lr(self, factor: float) -> None:
        """Scale the learning rate now and for the rest of the schedule (a torch scheduler's base_lrs are in its
        checkpointed state, so a resumed run keeps the scale)."""
        scheduler = self.engine.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        for group in self.engine.optimizer.param_groups:
            group["lr"] *= factor
        if scheduler is not None and hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in self.engine.optimizer.param_groups]

    def _latest_checkpoint(self) -> str | None:
        try:
            return str(self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip())
        except (OSError, UnicodeDecodeError):
            return None

    def _optimizer_stats(self) -> dict[str, float]:
        for optimizer in (self.engine.optimizer, getattr(self.engine.optimizer, "optimizer", None)):
            stats = getattr(optimizer, "trust_ratio_stats", None)
            if stats:
                return {f"trust_ratio_{key}": float(value) for key, value in stats.items()}
        return {}

    def _earlybert_step(self) -> dict[str, Any]:
        """Watch the masks; draw the ticket when they settle: prune for real and rebuild the engine, same step."""
        distance = self.bird.observe(self.step, self.engine.module)
        record: dict[str, Any] = {} if distance is None else {"earlybert_distance": distance}
        if self.bird.should_draw(self.step):
            ticket = self.bird.draw(self.step, self.engine.module)
            rewind = self.output_dir / "earlybert_rewind.pt"
            continuing = not self.config.earlybert.rewind
            weights = full_fp32_state_dict(self.engine) if continuing else torch.load(rewind, weights_only=True)
            moments = read_moments(self.engine) if continuing and self.config.earlybert.carry_optimizer_state \
                else None
            slim = prune_model(self.engine.module, ticket, weights).float()
            step, samples = self.engine.global_steps, self.engine.global_samples
            self.engine.destroy()
            self.engine = self._build_engine(slim, start_step=step)
            self.engine.set_progress(step, samples)
            carried = moments is not None and write_moments(
                self.engine, prune_adam_moments(moments, weights, ticket, slim.config), step)
            record["earlybert_moments_carried"] = carried
            record.update(earlybert_drawn_step=step, earlybert_heads=sum(slim.config.layer_heads),
                          earlybert_ffn=sum(slim.config.layer_intermediate))
        return record

    def save_rewind_point(self) -> None:
        """EarlyBERT's rewind target: the weights before the search (written once, by rank 0)."""
        path = self.output_dir / "earlybert_rewind.pt"
        if self.searching and self.config.earlybert.rewind and not path.exists():
            weights = full_fp32_state_dict(self.engine)
            if self.rank == 0:
                torch.save(weights, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
        dist.barrier()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """MLM loss and accuracy on a fixed slice of the validation split with fixed masks (comparable over time)."""
        engine = self.engine
        engine.module.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        validation = self.data.validation
        for index in range(self.config.training.eval_batches):
            start = (index * self.world_size + self.rank) * self.micro_batch
            rows = torch.stack([validation[(start + i) % len(validation)]["input_ids"]
                                for i in range(self.micro_batch)])
            out = engine(**self._batch(rows.long(), derived_seed(self.seed, 7919, index, self.rank)))
            count = out.masked_labels.numel()
            totals += torch.tensor([out.loss.double().item() * count,
                                    (out.logits.argmax(-1) == out.masked_labels).sum().item(), count],
                                   dtype=torch.float64)
        totals = totals.to(engine.device)
        dist.all_reduce(totals)
        engine.module.train()
        return {"val_loss": float(totals[0] / totals[2].clamp(min=1)),
                "val_accuracy": float(totals[1] / totals[2].clamp(min=1))}

    # --- outputs ----------------------------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        self.tracker.log(record, step=record["step"])

    def _refuse_if_diverged(self, what: str) -> None:
        if self.diverged_at is not None:
            raise RuntimeError(f"not writing {what}: training diverged at step {self.diverged_at}")

    def save_checkpoint(self) -> None:
        """A checkpoint (never from non-finite weights), then remove complete ones beyond `keep_checkpoints`."""
        self._refuse_if_diverged("a checkpoint")
        self.engine.save_checkpoint(str(self.checkpoint_dir))
        if self.rank == 0:
            prune_checkpoints(self.checkpoint_dir, self.config.training.keep_checkpoints)

    def finish(self) -> Path | None:
        """Write the final model folder (model + tokenizer) and the curves PNG; close the trackers."""
        final = self.output_dir / "final"
        self._refuse_if_diverged("final/")
        weights = full_fp32_state_dict(self.engine)
        if self.rank == 0:
            bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
            if bad:
                raise RuntimeError(f"not writing final/: the weights {bad[:3]} are not finite")
            model = BertForPreTraining(self.engine.module.config)
            model.load_state_dict(weights)
            tmp = self.output_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tmp, self.data.tokenizer)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            self.metrics.close()
            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
            (self.output_dir / "summary.json").write_text(json.dumps(
                {"steps": self.step, "final_dir": str(final), "theta": self.engine.get_pld_theta(),
                 "theta_expected": None if not self.config.pld.enabled else
                 theta_at(self.step, self.config.pld.theta, self.config.pld.gamma)}, indent=2))
        self.tracker.finish()
        dist.barrier()
        if self.lock is not None:
            self.lock.release()
        return final if self.rank == 0 else None


def build_run(config: DsPldConfig, output_dir: str | Path, resume: bool, *, replan_schedule: bool = False,
              allow_world_size_change: bool = False) -> PretrainingRun:
    """`replan_schedule`: on resume with another max_steps, plan the LR schedule for the new one (default: keep
    the schedule the run started with). `allow_world_size_change`: resume a checkpoint of another world size."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return PretrainingRun(config, output_dir, resume, replan_schedule, allow_world_size_change)

