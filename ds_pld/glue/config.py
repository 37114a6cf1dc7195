"""The `glue` block of a fine-tuning DeepSpeed config, validated once and removed before DeepSpeed sees the rest.

  "glue": {
    "learning_rate": 5e-5, "epochs": 3, "batch_size": 32, "max_seq_length": 128, "warmup_ratio": 0.1,
    "eval_batch_size": 64, "weight_decay": 0.01, "classifier_dropout": 0.1, "seeds": [1, 2, 3],
    "aggregate": "median",
    "tasks": {"rte": {"learning_rate": 7e-5, "epochs": 10}, ...},     # per-task overrides of the five above
    "earlybert": {...}                                                 # optional: EarlyBERT fine-tuning mode
  }

The glue block owns the batch size and the schedule (linear warmup, linear decay to 0), so the rest of the file must
not set `train_batch_size`, `gradient_accumulation_steps` or `scheduler`; it may set
`train_micro_batch_size_per_gpu` (the accumulation steps follow), the optimizer, precision and ZeRO.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ds_pld.config import read_json
from ds_pld.config_errors import ConfigError, check_keys, number
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.glue.tasks import get_task

BLOCK = "glue"
AGGREGATES = ("median", "mean")
# DeepSpeed keys the glue block decides; pretraining-only blocks that would be silently ignored here.
OWNED_DEEPSPEED_KEYS = ("train_batch_size", "gradient_accumulation_steps", "scheduler")
PRETRAINING_BLOCKS = ("model", "data", "lr_schedule", "training", "earlybert")

@dataclass(frozen=True)
class TaskSettings:
    """What may differ per task."""

    learning_rate: float = 5e-5
    epochs: float = 3.0
    batch_size: int = 32
    max_seq_length: int = 128
    warmup_ratio: float = 0.1

    @classmethod
    def from_dict(cls, block: Mapping[str, Any], where: str, base: TaskSettings) -> TaskSettings:
        return cls(
            learning_rate=number(block, "learning_rate", where, base.learning_rate, low=0.0, low_open=True),
            epochs=number(block, "epochs", where, base.epochs, low=0.0, low_open=True),
            batch_size=number(block, "batch_size", where, base.batch_size, integer=True, low=1),
            max_seq_length=number(block, "max_seq_length", where, base.max_seq_length, integer=True, low=8),
            warmup_ratio=number(block, "warmup_ratio", where, base.warmup_ratio, low=0.0, high=1.0, high_open=True),
        )


TASK_KEYS = tuple(f.name for f in fields(TaskSettings))


@dataclass(frozen=True)
class GlueConfig:
    """The parsed `glue` block; `settings(task)` merges the defaults with the task's overrides."""

    defaults: TaskSettings = field(default_factory=TaskSettings)
    tasks: dict[str, TaskSettings] = field(default_factory=dict)
    eval_batch_size: int = 64
    weight_decay: float = 0.01
    classifier_dropout: float = 0.1
    seeds: tuple[int, ...] = (1, 2, 3)
    aggregate: str = "median"
    earlybert: EarlyBertConfig | None = None

    def settings(self, task: str) -> TaskSettings:
        return self.tasks.get(get_task(task).name, self.defaults)

    def with_overrides(self, epochs: float | None = None, seeds: tuple[int, ...] | None = None) -> GlueConfig:
        """Command-line overrides: `epochs` for every task, the seed list."""
        config = self
        if epochs is not None:
            if epochs <= 0:
                raise ConfigError(f"--epochs = {epochs} must be > 0")
            config = replace(config, defaults=replace(config.defaults, epochs=float(epochs)),
                             tasks={k: replace(v, epochs=float(epochs)) for k, v in config.tasks.items()})
        if seeds is not None:
            if not seeds:
                raise ConfigError("--seeds is empty")
            config = replace(config, seeds=tuple(seeds))
        return config

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> GlueConfig:
        block = block or {}
        check_keys(block, BLOCK, allowed=(*TASK_KEYS, "tasks", "eval_batch_size", "weight_decay",
                                          "classifier_dropout", "seeds", "aggregate", "earlybert"))
        d = cls()
        defaults = TaskSettings.from_dict(block, BLOCK, TaskSettings())
        per_task = block.get("tasks") or {}
        if not isinstance(per_task, Mapping):
            raise ConfigError(f"'{BLOCK}.tasks' must be a JSON object of task name -> settings")
        tasks: dict[str, TaskSettings] = {}
        for name, overrides in per_task.items():
            where = f"{BLOCK}.tasks.{name}"
            try:
                task = get_task(name)
            except ConfigError as err:
                raise ConfigError(f"'{where}': {err}") from None
            check_keys(overrides, where, allowed=TASK_KEYS)
            tasks[task.name] = TaskSettings.from_dict(overrides, where, defaults)
        seeds = block.get("seeds", list(d.seeds))
        if (not isinstance(seeds, list) or not seeds
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
            raise ConfigError(f"'{BLOCK}.seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
        how = block.get("aggregate", d.aggregate)
        if how not in AGGREGATES:
            raise ConfigError(f"'{BLOCK}.aggregate' = {how!r} must be one of {AGGREGATES}")
        try:
            earlybert = EarlyBertConfig.from_dict(block.get("earlybert"))
        except ConfigError as err:
            raise ConfigError(str(err).replace("'earlybert", f"'{BLOCK}.earlybert")) from None
        return cls(
            defaults=defaults, tasks=tasks,
            eval_batch_size=number(block, "eval_batch_size", BLOCK, d.eval_batch_size, integer=True, low=1),
            weight_decay=number(block, "weight_decay", BLOCK, d.weight_decay, low=0.0),
            classifier_dropout=number(block, "classifier_dropout", BLOCK, d.classifier_dropout, low=0.0, high=1.0,
                                      high_open=True),
            seeds=tuple(seeds), aggregate=how, earlybert=earlybert)


def parse_glue_config(source: str | Path | Mapping[str, Any]) -> tuple[GlueConfig, dict[str, Any]]:
    """(the glue block, the rest of the config for `ds_pld.initialize`). Errors name the key and the file."""
    where = "<dict>" if isinstance(source, Mapping) else str(source)
    raw = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else read_json(source)
    try:
        glue = GlueConfig.from_dict(raw.pop(BLOCK, None))
        for key in OWNED_DEEPSPEED_KEYS:
            if key in raw:
                raise ConfigError(f"'{key}' is set by the '{BLOCK}' block in fine-tuning (batch_size, warmup_ratio); "
                                  f"remove it")
        for key in PRETRAINING_BLOCKS:
            if key in raw:
                hint = f"; EarlyBERT fine-tuning goes in '{BLOCK}.earlybert'" if key == "earlybert" else ""
                raise ConfigError(f"the pretraining block '{key}' has no effect in fine-tuning; remove it{hint}")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return glue, raw
