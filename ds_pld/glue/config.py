"""The `glue` block of a fine-tuning DeepSpeed config, validated once and removed before DeepSpeed sees the rest.

  "glue": {
    "learning_rate": 5e-5, "epochs": 3, "batch_size": 32, "max_seq_length": 128, "warmup_ratio": 0.1,
    "eval_batch_size": 64, "weight_decay": 0.01, "classifier_dropout": 0.1, "seeds": [1, 2, 3],
    "aggregate": "median",
    "tasks": {"rte": {"learning_rate": 7e-5, "epochs": 10}, ...},     # per-task overrides of the five above
                                                                       # (custom tasks too, given the glue_dir)
    "earlybert": {...}                                                 # optional: EarlyBERT fine-tuning mode
  }

The glue block owns the batch size and the schedule (linear warmup, linear decay to 0), so the rest of the file must
not set `train_batch_size`, `gradient_accumulation_steps` or `scheduler`; it may set
`train_micro_batch_size_per_gpu` (the accumulation steps follow), the optimizer, precision and ZeRO.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ds_pld.config import load_config_dict
from ds_pld.config_errors import ConfigError, Float, Int, config_block, in_source, parse_block
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.glue.tasks import get_task, task_key

BLOCK = "glue"
# DeepSpeed keys the glue block decides; pretraining-only blocks that would be silently ignored here.
OWNED_DEEPSPEED_KEYS = ("train_batch_size", "gradient_accumulation_steps", "scheduler")
PRETRAINING_BLOCKS = ("model", "data", "lr_schedule", "training", "earlybert")
Positive = Annotated[Float, Field(gt=0.0)]


@config_block
class TaskSettings:
    """What may differ per task."""

    learning_rate: Positive = 5e-5
    epochs: Positive = 3.0
    batch_size: Annotated[Int, Field(ge=1)] = 32
    max_seq_length: Annotated[Int, Field(ge=8)] = 128
    warmup_ratio: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.1


TASK_KEYS = tuple(f.name for f in fields(TaskSettings))


@config_block
class GlueConfig:
    """The parsed `glue` block; `settings(task)` merges the defaults with the task's overrides."""

    defaults: TaskSettings = field(default_factory=TaskSettings)
    tasks: dict[str, TaskSettings] = field(default_factory=dict)
    eval_batch_size: Annotated[Int, Field(ge=1)] = 64
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.01
    classifier_dropout: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.1
    seeds: Annotated[tuple[Annotated[Int, Field(ge=0)], ...], Field(min_length=1)] = (1, 2, 3)
    aggregate: Literal["median", "mean"] = "median"
    earlybert: EarlyBertConfig | None = None

    def settings(self, task: str) -> TaskSettings:
        """The task's settings; a task without overrides (a custom task, say) gets the defaults."""
        return self.tasks.get(task_key(task), self.defaults)

    def with_overrides(self, epochs: float | None = None, seeds: tuple[int, ...] | None = None) -> GlueConfig:
        """Command-line overrides: `epochs` for every task, the seed list."""
        config = self
        if epochs is not None:
            if epochs <= 0:
                raise ConfigError(f"--epochs = {epochs} must be > 0")
            config = replace(config, defaults=replace(config.defaults, epochs=float(epochs)),
                             tasks={k: replace(v, epochs=float(epochs)) for k, v in config.tasks.items()})
        if seeds is not None:
            if not seeds or any(seed < 0 for seed in seeds):
                raise ConfigError(f"--seeds = {list(seeds)} must be a non-empty list of integers >= 0")
            config = replace(config, seeds=tuple(seeds))
        return config

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, glue_dir: str | Path | None = None) -> GlueConfig:
        """The block holds the default task settings flat; `tasks.<name>` overrides them for one task (a GLUE task,
        or a custom task folder in `glue_dir`)."""
        block = {} if block is None else block
        if not isinstance(block, Mapping):
            raise ConfigError(f"'{BLOCK}' must be a JSON object, got {type(block).__name__}")
        defaults = parse_block(TaskSettings, {k: v for k, v in block.items() if k in TASK_KEYS}, BLOCK)
        per_task = block.get("tasks") or {}
        if not isinstance(per_task, Mapping):
            raise ConfigError(f"'{BLOCK}.tasks' must be a JSON object of task name -> settings")
        tasks: dict[str, TaskSettings] = {}
        for name, overrides in per_task.items():
            where = f"{BLOCK}.tasks.{name}"
            try:
                task = get_task(name, glue_dir)
            except ConfigError as err:
                raise ConfigError(f"'{where}': {err}") from None
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"'{where}' must be a JSON object, got {type(overrides).__name__}")
            tasks[task.name] = parse_block(TaskSettings, {**asdict(defaults), **overrides}, where)
        derived = dict(defaults=defaults, tasks=tasks,
                       earlybert=EarlyBertConfig.from_dict(block.get("earlybert"), f"{BLOCK}.earlybert"))
        rest = {k: v for k, v in block.items() if k not in (*TASK_KEYS, "tasks", "earlybert")}
        return parse_block(cls, rest, BLOCK, derived=derived, also_allowed=(*TASK_KEYS, "tasks", "earlybert"))


def parse_glue_config(source: str | Path | Mapping[str, Any], glue_dir: str | Path | None = None
                      ) -> tuple[GlueConfig, dict[str, Any]]:
    """(the glue block, the rest of the config for `ds_pld.initialize`). Errors name the key and the file.
    `glue_dir`: where custom tasks named in `glue.tasks` are looked up."""
    raw, where = load_config_dict(source)
    with in_source(where):
        glue = GlueConfig.from_dict(raw.pop(BLOCK, None), glue_dir)
        for key in OWNED_DEEPSPEED_KEYS:
            if key in raw:
                raise ConfigError(f"'{key}' is set by the '{BLOCK}' block in fine-tuning (batch_size, warmup_ratio); "
                                  f"remove it")
        for key in PRETRAINING_BLOCKS:
            if key in raw:
                hint = f"; EarlyBERT fine-tuning goes in '{BLOCK}.earlybert'" if key == "earlybert" else ""
                raise ConfigError(f"the pretraining block '{key}' has no effect in fine-tuning; remove it{hint}")
    return glue, raw
