"""The pretraining job's own config blocks (`training`, `data`, `lr_schedule`, `wandb`), and the run config: the
core config (ds_pld.config) composed with them. The trainer parses its blocks here, so the plugin core never has to.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from ds_pld.config import DsPldConfig, NamedConfig, load_config_dict, parse_config
from ds_pld.config_errors import Bool, ConfigError, Float, Int, Names, Str, config_block, in_source, one_of, parse_block
from ds_pld.data.corpus import ENCODING_ERRORS

Schedule = Literal["warmup_exp_decay", "warmup_linear", "constant"]
DivergencePolicy = Literal["stop", "rollback"]
Interval = Annotated[Int, Field(ge=1)]
Count = Annotated[Int, Field(ge=0)]
OpenFraction = Annotated[Float, Field(gt=0.0, lt=1.0)]
# Keys that were taken out, with what to do instead: a config that still sets one learns why, not just "unknown".
REMOVED_TRAINING_KEYS = (("log_every", "every step is written to metrics.jsonl (and W&B), so there is nothing to "
                                       "thin out; remove the key"),)


@config_block
class TrainingConfig:
    """Loop lengths and intervals; CLI flags may override them."""

    max_steps: Interval = 1000
    checkpoint_every: Interval = 500
    eval_every: Interval = 100
    eval_batches: Interval = 8
    seed: Count = 42
    keep_checkpoints: Count = 3
    on_divergence: DivergencePolicy = "stop"
    max_rollbacks: Count = 3
    rollback_lr_factor: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> TrainingConfig:
        for key, instead in REMOVED_TRAINING_KEYS:
            if isinstance(block, Mapping) and key in block:
                raise ConfigError(f"'training.{key}' was removed: {instead}")
        return parse_block(cls, block, "training")


@config_block
class DataConfig:
    """Where the packed dataset comes from: a prepared folder (`path`) or a corpus prepared on first use.
    `train_sequences` keeps only the first N packed training sequences, for data-limited runs that repeat a small
    corpus for many epochs (the validation split is unchanged)."""

    path: Str | None = None
    corpus: Names = ()
    tokenizer: Str | None = None
    max_seq_length: Annotated[Int, Field(ge=8)] = 128
    vocab_size: Annotated[Int, Field(ge=64)] = 8192
    validation_fraction: OpenFraction = 0.05
    mlm_probability: OpenFraction = 0.15
    train_sequences: Annotated[Int, Field(ge=1)] | None = None  # use only the first N training sequences
    encoding_errors: Annotated[Str, AfterValidator(one_of(ENCODING_ERRORS))] = "strict"

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> DataConfig:
        return parse_block(cls, block, "data")


@config_block
class LRScheduleConfig:
    """`warmup_exp_decay`: the PLD recipe (linear warmup over warmup_proportion of the steps, then
    lr * decay_rate ** ((step - warmup) / decay_steps)); `warmup_linear`: linear warmup then linear decay to 0."""

    type: Schedule = "warmup_exp_decay"
    warmup_proportion: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.02
    decay_rate: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.99
    decay_steps: Interval = 1000

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> LRScheduleConfig | None:
        """None without a block (DeepSpeed's own `scheduler`, if any, then applies)."""
        return None if block is None else parse_block(cls, block, "lr_schedule", required=("type",))


@config_block
class WandbConfig:
    """Same keys as DeepSpeed's `wandb` monitor block; handled here so a resumed job continues the same run.
    `tags` is a list of strings; a single string is one tag ("pld" -> ("pld",)), as `data.corpus` is one file."""

    enabled: Bool = False
    project: Str = "ds-pld"
    group: Str | None = None
    team: Str | None = None
    log_all_ranks: Bool = False
    tags: Names = ()

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> WandbConfig:
        return parse_block(cls, block, "wandb")


@dataclass(frozen=True)
class RunConfig(DsPldConfig):
    """A pretraining run's whole config: the core blocks and DeepSpeed dict (DsPldConfig, which is what
    `ds_pld.initialize` reads from it) plus the trainer's blocks."""

    data: DataConfig = field(default_factory=DataConfig)
    lr_schedule: LRScheduleConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def parse_run_config(source: str | Path | Mapping[str, Any] | RunConfig) -> RunConfig:
    """Parse a pretraining config (path, dict, or a `ds_pld.config.with_overrides` result) once: the core blocks by
    ds_pld.config, the trainer's here. Every error names the key and the source."""
    if isinstance(source, RunConfig):
        return source
    raw, where = load_config_dict(source)
    core = parse_config(NamedConfig(raw, where))
    with in_source(where):
        if core.model is not None and core.model.next_sentence_head:
            raise ConfigError("'model.next_sentence_head' = true: the pretraining data pipeline makes no "
                              "next-sentence labels, so the head would never be trained; remove the key")
        return RunConfig(
            **{f.name: getattr(core, f.name) for f in fields(DsPldConfig)},
            data=DataConfig.from_dict(raw.get("data")),
            lr_schedule=LRScheduleConfig.from_dict(raw.get("lr_schedule")),
            training=TrainingConfig.from_dict(raw.get("training")),
            wandb=WandbConfig.from_dict(raw.get("wandb")),
        )
