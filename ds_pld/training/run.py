"""A pretraining run on this rank: what the loop (ds_pld.training.pretrain) works on, assembled by `build_run`
from the config, the run folder and the checkpoint it resumes. The step, evaluation, rollback and outputs are
functions of the run in their own modules."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from torch import nn

import ds_pld
from ds_pld.algorithms import Algorithm, State, build_algorithms, register_checkpoint_state
from ds_pld.config_errors import ConfigError
from ds_pld.data import MLMMasker, PretrainingData, StepBatches
from ds_pld.earlybert import validate_for_model
from ds_pld.engine import DsPldEngine
from ds_pld.models import BertForPreTraining
from ds_pld.optim.param_groups import weight_decay_groups
from ds_pld.training.batch_size import resolve_batch_sizes
from ds_pld.training.config import RunConfig
from ds_pld.training.divergence import DIVERGENCE_STATE, DivergenceState, scale_lr
from ds_pld.training.inputs import load_data, model_config
from ds_pld.training.lock import RunFolderLock, lock_run_folder
from ds_pld.training.metrics import MetricsFile, read_metrics
from ds_pld.training.resume import check_resume, resume_point
from ds_pld.training.schedules import build_lr_scheduler
from ds_pld.training.tracking import WandbTracker

CHECKPOINT_DIR = "checkpoints"
REWIND_FILE = "earlybert_rewind.pt"


@dataclass(eq=False)
class PretrainingRun:
    """One pretraining job on this rank: plain state, no behaviour. `build_run` makes it; train_step, evaluate,
    roll_back, save_checkpoint and finish are functions of it."""

    config: RunConfig
    output_dir: Path
    rank: int
    world_size: int
    lock: RunFolderLock | None
    ds_config: dict[str, Any]  # the DeepSpeed block with the batch-size triple resolved
    micro_batch: int
    accumulation: int
    resumed_from: int | None  # the checkpoint's step
    schedule_steps: int  # what the learning-rate schedule is planned for
    data: PretrainingData
    batches: StepBatches
    masker: MLMMasker
    algorithms: list[Algorithm]
    divergence: DivergenceState = field(default_factory=DivergenceState)
    state: State | None = None  # the engine, once built
    metrics: MetricsFile | None = None  # rank 0's metrics.jsonl
    tracker: WandbTracker | None = None
    diverged_at: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def engine(self) -> DsPldEngine:
        return self.state.engine

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.engine.global_steps

    @property
    def max_steps(self) -> int:
        return self.config.training.max_steps

    @property
    def seed(self) -> int:
        return self.config.training.seed


def build_engine(run: PretrainingRun, model: nn.Module, start_step: int = 0) -> DsPldEngine:
    """An engine for `model` whose LR schedule starts at `start_step` (non-zero: EarlyBERT's rebuilt engine, which
    keeps a rollback's lr scale too), with the algorithms' and the rollback state in its checkpoints."""
    schedule = run.config.lr_schedule
    scheduler = None if schedule is None else (
        lambda optimizer: build_lr_scheduler(optimizer, schedule, run.schedule_steps, start_step))
    optimizer_type = str((run.ds_config.get("optimizer") or {}).get("type", "")).lower()
    groups = None if optimizer_type in ("", "lamb") else weight_decay_groups(model)
    config = dataclasses.replace(run.config, deepspeed=run.ds_config)
    engine, *_ = ds_pld.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=scheduler)
    if start_step and run.divergence.lr_scale != 1.0:
        scale_lr(engine, run.divergence.lr_scale)
    register_checkpoint_state(engine, run.algorithms)
    engine.extra_state[DIVERGENCE_STATE] = run.divergence
    engine.checkpoint_meta.update(seed=run.seed, max_steps=run.max_steps, schedule_steps=run.schedule_steps)
    return engine


def build_run(config: RunConfig, output_dir: str | Path, resume: bool, *, replan_schedule: bool = False,
              allow_world_size_change: bool = False) -> PretrainingRun:
    """`replan_schedule`: on resume with another max_steps, plan the LR schedule for the new one (default: keep
    the schedule the run started with). `allow_world_size_change`: resume a checkpoint of another world size."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size, seed = dist.get_rank(), dist.get_world_size(), config.training.seed
    lock = lock_run_folder(output_dir, rank)  # before anything in the folder is written
    ds_config = dict(config.deepspeed)
    try:
        micro_batch, accumulation = resolve_batch_sizes(ds_config, world_size)
    except ConfigError as err:
        raise ConfigError(f"{config.source}: {err}") from None
    meta = resume_point(output_dir / CHECKPOINT_DIR, resume, rank)
    schedule_steps = config.training.max_steps if meta is None else check_resume(
        meta, output_dir / CHECKPOINT_DIR, config.training.max_steps, world_size, rank, replan_schedule,
        allow_world_size_change)
    data = load_data(config, output_dir, rank)
    model = model_config(config, data, meta)
    if config.earlybert is not None:
        validate_for_model(config.earlybert, model)
    run = PretrainingRun(
        config=config, output_dir=output_dir, rank=rank, world_size=world_size, lock=lock, ds_config=ds_config,
        micro_batch=micro_batch, accumulation=accumulation,
        resumed_from=None if meta is None else int(meta["global_steps"]), schedule_steps=schedule_steps, data=data,
        batches=StepBatches(data.train, micro_batch, accumulation, world_size, rank, seed),
        masker=MLMMasker(data.tokenizer, config.data.mlm_probability),
        algorithms=build_algorithms(config.pld.enabled, config.earlybert, rewind_path=output_dir / REWIND_FILE))
    torch.manual_seed(seed)
    run.state = State(build_engine(run, BertForPreTraining(model)), lambda m, step: build_engine(run, m, step))
    if meta is not None:
        run.engine.load_checkpoint(str(run.checkpoint_dir), tag=meta["tag"])
    run.metrics = MetricsFile(output_dir / "metrics.jsonl", run.resumed_from) if rank == 0 else None
    run.tracker = WandbTracker(config.wandb, output_dir, rank, run_summary(run), resume)
    if run.metrics is not None and run.resumed_from is not None:
        run.tracker.replay(read_metrics(run.metrics.path), run.resumed_from)
    return run


def run_summary(run: PretrainingRun) -> dict[str, Any]:
    """What W&B records as the run's config."""
    config = run.config
    return {"model": run.engine.module.config.to_dict(), "deepspeed": run.ds_config, "world_size": run.world_size,
            "pld": dataclasses.asdict(config.pld), "seed": run.seed, "max_steps": run.max_steps,
            "earlybert": None if config.earlybert is None else dataclasses.asdict(config.earlybert)}
