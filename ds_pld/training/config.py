"""The pretraining job's own config blocks (`training`, `data`, `lr_schedule`, `wandb`), parsed into typed objects."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ds_pld.config_errors import ConfigError, boolean, check_keys, number
from ds_pld.data.corpus import check_encoding_errors

SCHEDULES = ("warmup_exp_decay", "warmup_linear", "constant")
DIVERGENCE_POLICIES = ("stop", "rollback")


@dataclass(frozen=True)
class TrainingConfig:
    """Loop lengths and intervals; CLI flags may override them."""

    max_steps: int = 1000
    checkpoint_every: int = 500
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 1
    seed: int = 42
    keep_checkpoints: int = 3
    on_divergence: str = "stop"
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> TrainingConfig:
        block = block or {}
        check_keys(block, "training", allowed=cls.__dataclass_fields__)
        d = cls()
        policy = block.get("on_divergence", d.on_divergence)
        if policy not in DIVERGENCE_POLICIES:
            raise ConfigError(f"'training.on_divergence' = {policy!r} must be one of {DIVERGENCE_POLICIES}")
        factor = number(block, "rollback_lr_factor", "training", d.rollback_lr_factor, low=0.0, high=1.0,
                        low_open=True)
        integers = [key for key in cls.__dataclass_fields__ if key not in ("on_divergence", "rollback_lr_factor")]
        return cls(on_divergence=policy, rollback_lr_factor=factor, **{
            key: number(block, key, "training", getattr(d, key), integer=True,
                        low=0 if key in ("seed", "keep_checkpoints", "max_rollbacks") else 1) for key in integers})


@dataclass(frozen=True)
class DataConfig:
    """Where the packed dataset comes from: a prepared folder (`path`) or a corpus prepared on first use."""

    path: str | None = None
    corpus: tuple[str, ...] = ()
    tokenizer: str | None = None
    max_seq_length: int = 128
    vocab_size: int = 8192
    validation_fraction: float = 0.05
    mlm_probability: float = 0.15
    encoding_errors: str = "strict"

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> DataConfig:
        block = block or {}
        check_keys(block, "data", allowed=cls.__dataclass_fields__)
        corpus = block.get("corpus", ())
        if isinstance(corpus, str):
            corpus = (corpus,)
        d = cls()
        return cls(
            path=block.get("path"),
            corpus=tuple(corpus),
            tokenizer=block.get("tokenizer"),
            max_seq_length=number(block, "max_seq_length", "data", d.max_seq_length, integer=True, low=8),
            vocab_size=number(block, "vocab_size", "data", d.vocab_size, integer=True, low=64),
            validation_fraction=number(block, "validation_fraction", "data", d.validation_fraction, low=0.0,
                                       high=1.0, low_open=True, high_open=True),
            mlm_probability=number(block, "mlm_probability", "data", d.mlm_probability, low=0.0, high=1.0,
                                   low_open=True, high_open=True),
            encoding_errors=check_encoding_errors(block.get("encoding_errors", d.encoding_errors), "data"),
        )


@dataclass(frozen=True)
class LRScheduleConfig:
    """`warmup_exp_decay`: the PLD recipe (linear warmup over warmup_proportion of the steps, then
    lr * decay_rate ** ((step - warmup) / decay_steps)); `warmup_linear`: linear warmup then linear decay to 0."""

    type: str = "warmup_exp_decay"
    warmup_proportion: float = 0.02
    decay_rate: float = 0.99
    decay_steps: int = 1000

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> LRScheduleConfig | None:
        if block is None:
            return None
        check_keys(block, "lr_schedule", allowed=cls.__dataclass_fields__, required=("type",))
        if block["type"] not in SCHEDULES:
            raise ConfigError(f"'lr_schedule.type' = {block['type']!r} must be one of {SCHEDULES}")
        d = cls()
        return cls(
            type=block["type"],
            warmup_proportion=number(block, "warmup_proportion", "lr_schedule", d.warmup_proportion, low=0.0,
                                     high=1.0, high_open=True),
            decay_rate=number(block, "decay_rate", "lr_schedule", d.decay_rate, low=0.0, high=1.0, low_open=True),
            decay_steps=number(block, "decay_steps", "lr_schedule", d.decay_steps, integer=True, low=1),
        )


@dataclass(frozen=True)
class WandbConfig:
    """Same keys as DeepSpeed's `wandb` monitor block; handled here so a resumed job continues the same run."""

    enabled: bool = False
    project: str = "ds-pld"
    group: str | None = None
    team: str | None = None
    log_all_ranks: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> WandbConfig:
        block = block or {}
        check_keys(block, "wandb", allowed=cls.__dataclass_fields__)
        return cls(enabled=boolean(block, "enabled", "wandb", False), project=str(block.get("project", "ds-pld")),
                   group=block.get("group"), team=block.get("team"),
                   log_all_ranks=boolean(block, "log_all_ranks", "wandb", False),
                   tags=tuple(block.get("tags", ())))
