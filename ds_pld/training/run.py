"""A pretraining run on this rank: what the loop (ds_pld.training.pretrain) works on, assembled once by `build_run`
from the config, the run folder and the checkpoint it resumes. The run itself is frozen; what changes during
training lives with its owner: the engine in the event bus's `State`, the rollback state in the `DivergenceGuard`,
the metrics file and W&B run in `MetricsLog`, the run folder's lock in `Checkpointing`."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

import ds_pld
from ds_pld.algorithms import Algorithm, State, build_algorithms, register_checkpoint_state
from ds_pld.algorithms.pld import ProgressiveLayerDropping
from ds_pld.algorithms.random_ltd import RandomTokenDropping
from ds_pld.algorithms.select import find_algorithm
from ds_pld.config_errors import ConfigError, in_source
from ds_pld.data import MLMMasker, PretrainingData, StepBatches
from ds_pld.earlybert import validate_for_model
from ds_pld.models import BertForPreTraining
from ds_pld.models.init_from import find_source, load_source_weights
from ds_pld.optim.param_groups import weight_decay_groups
from ds_pld.plugin_state import plugin_of
from ds_pld.training.batch_size import resolve_batch_sizes
from ds_pld.training.config import RunConfig
from ds_pld.training.divergence import DivergenceGuard, scale_lr
from ds_pld.training.evaluate import Evaluation, Validation
from ds_pld.training.inputs import load_data, model_config
from ds_pld.training.lock import lock_run_folder
from ds_pld.training.outputs import Checkpointing, MetricsLog
from ds_pld.training.resume import check_resume, check_resumed_init, print0, resume_point
from ds_pld.training.schedules import build_lr_scheduler

__all__ = ["PretrainingRun", "build_run", "resolve_batch_sizes"]

CHECKPOINT_DIR = "checkpoints"
REWIND_FILE = "earlybert_rewind.pt"


@dataclass(frozen=True, eq=False)
class PretrainingRun:
    """One pretraining job on this rank. `algorithms`: the speed-ups (PLD, EarlyBERT); `callbacks`: the loop's own
    duties after a step (evaluation, metrics log, checkpointing); `guard`: the divergence check, first at STEP_END."""

    config: RunConfig
    output_dir: Path
    rank: int
    world_size: int
    ds_config: dict[str, Any]  # the DeepSpeed block with the batch-size triple resolved
    micro_batch: int
    accumulation: int
    resumed_from: int | None  # the checkpoint's step
    data: PretrainingData
    batches: StepBatches
    masker: MLMMasker
    state: State
    guard: DivergenceGuard
    algorithms: list[Algorithm]
    callbacks: list[Algorithm]

    @property
    def events(self) -> list[Algorithm]:
        """Everything that acts on the step's events, in order."""
        return [self.guard, *self.algorithms, *self.callbacks]

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def engine(self) -> DeepSpeedEngine:
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

    @property
    def metrics_log(self) -> MetricsLog:
        return find_algorithm(self.callbacks, MetricsLog)

    @property
    def evaluation(self) -> Evaluation:
        return find_algorithm(self.callbacks, Evaluation)

    @property
    def checkpointing(self) -> Checkpointing:
        return find_algorithm(self.callbacks, Checkpointing)


@dataclass(frozen=True)
class EngineFactory:
    """Builds the run's engines: the first, and EarlyBERT's rebuilt one whose LR schedule starts at `start_step`
    (keeping a rollback's lr scale), each with the PLD algorithm moved onto it and the run's state in its
    checkpoints."""

    config: RunConfig
    ds_config: dict[str, Any]
    schedule_steps: int
    guard: DivergenceGuard
    stateful: Sequence[Algorithm]
    meta: dict[str, Any]

    def __call__(self, model: nn.Module, start_step: int = 0) -> DeepSpeedEngine:
        schedule = self.config.lr_schedule
        scheduler = None if schedule is None else (
            lambda optimizer: build_lr_scheduler(optimizer, schedule, self.schedule_steps, start_step))
        optimizer_type = str((self.ds_config.get("optimizer") or {}).get("type", "")).lower()
        groups = None if optimizer_type in ("", "lamb") else weight_decay_groups(model)
        # The trainer owns the model and EarlyBERT; the plugin gets the DeepSpeed part and PLD.
        config = dataclasses.replace(self.config, deepspeed=self.ds_config, model=None, earlybert=None,
                                     init_from=None)
        engine, *_ = ds_pld.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=scheduler,
                                       pld=find_algorithm(self.stateful, ProgressiveLayerDropping),
                                       random_ltd=find_algorithm(self.stateful, RandomTokenDropping))
        if start_step and self.guard.state.lr_scale != 1.0:
            scale_lr(engine, self.guard.state.lr_scale)
        register_checkpoint_state(engine, [self.guard, *self.stateful])
        plugin_of(engine).checkpoint_meta.update(self.meta)
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
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    meta = resume_point(checkpoint_dir, resume, rank)
    schedule_steps = config.training.max_steps if meta is None else check_resume(
        meta, checkpoint_dir, config.training.max_steps, world_size, rank, replan_schedule, allow_world_size_change)
    # Weights to start from: only for a fresh run; a resume continues its own checkpoint (check_resumed_init).
    with in_source(config.source):
        source = None if meta is not None or config.init_from is None else find_source(config.init_from.path)
        if meta is not None:
            check_resumed_init(meta, config.init_from, checkpoint_dir, rank)
    started_from = meta.get("init_from") if meta is not None else None if source is None else str(
        source.path.resolve())
    data = load_data(config, output_dir, rank, source, started_from)
    with in_source(config.source):
        model = model_config(config, data, meta, source)
    if config.earlybert is not None:
        validate_for_model(config.earlybert, model)
    guard = DivergenceGuard(config.training, checkpoint_dir, rank)
    algorithms = build_algorithms(config.pld, config.earlybert, rewind_path=output_dir / REWIND_FILE,
                                  random_ltd=config.random_ltd)
    build_engine = EngineFactory(config, ds_config, schedule_steps, guard, algorithms,
                                 {"seed": seed, "max_steps": config.training.max_steps,
                                  "schedule_steps": schedule_steps, "init_from": started_from})
    torch.manual_seed(seed)
    module = BertForPreTraining(model)
    if source is not None:
        print0(rank, f"starting from {source.describe()}: its weights only; the optimizer, the learning-rate "
                     "schedule, the step count and the data position start fresh")
        for note in load_source_weights(module, source):
            print0(rank, note)
        schedule = config.lr_schedule
        if schedule is not None and int(schedule.warmup_proportion * config.training.max_steps) == 0:
            print0(rank, "WARNING: 'lr_schedule' has no warmup step: Adam's moments start fresh, and a full-size "
                         "first step can throw the loaded model off; set 'lr_schedule.warmup_proportion'")
    state = State(build_engine(module), build_engine)
    if meta is not None:
        ds_pld.load_checkpoint(state.engine, checkpoint_dir, tag=meta["tag"])
    masker = MLMMasker(data.tokenizer, config.data.mlm_probability)
    resumed_from = None if meta is None else int(meta["global_steps"])
    validation = Validation(data.validation, masker, micro_batch, config.training.eval_batches, seed, rank,
                            world_size)
    metrics_log = MetricsLog(output_dir, rank, config.wandb, run_summary(config, state, ds_config, world_size),
                             resumed_from)
    callbacks: list[Algorithm] = [
        Evaluation(validation, config.training.eval_every, config.training.max_steps), metrics_log,
        Checkpointing(output_dir, checkpoint_dir, rank, config.training, config.pld, guard, data.tokenizer, lock)]
    return PretrainingRun(
        config=config, output_dir=output_dir, rank=rank, world_size=world_size, ds_config=ds_config,
        micro_batch=micro_batch, accumulation=accumulation, resumed_from=resumed_from, data=data,
        batches=StepBatches(data.train, micro_batch, accumulation, world_size, rank, seed), masker=masker,
        state=state, guard=guard, algorithms=algorithms, callbacks=callbacks)


def run_summary(config: RunConfig, state: State, ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What W&B records as the run's config."""
    return {"model": state.model.config.to_dict(), "deepspeed": ds_config, "world_size": world_size,
            "pld": dataclasses.asdict(config.pld), "seed": config.training.seed,
            "max_steps": config.training.max_steps,
            "init_from": None if config.init_from is None else config.init_from.path,
            "earlybert": None if config.earlybert is None else dataclasses.asdict(config.earlybert)}
