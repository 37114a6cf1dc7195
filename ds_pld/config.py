"""One place where a ds_configs JSON is read, our blocks are validated and removed, and the rest goes to DeepSpeed."""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.models.config import BertConfig, build_bert_config
from ds_pld.pld import PLDConfig
from ds_pld.training.config import DataConfig, LRScheduleConfig, TrainingConfig, WandbConfig

EXTENSION_BLOCKS = ("progressive_layer_drop", "earlybert", "model", "data", "lr_schedule", "training", "wandb")


@dataclass(frozen=True)
class DsPldConfig:
    """Our blocks as typed objects, plus `deepspeed`: the dict DeepSpeed receives (our blocks removed)."""

    deepspeed: dict[str, Any]
    pld: PLDConfig = field(default_factory=PLDConfig)
    earlybert: EarlyBertConfig | None = None
    model: BertConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lr_schedule: LRScheduleConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source: str = "<dict>"


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return raw


def parse_config(source: str | Path | Mapping[str, Any] | DsPldConfig) -> DsPldConfig:
    """Parse a config path or dict once; every error names the key (and the file when there is one)."""
    if isinstance(source, DsPldConfig):
        return source
    where = "<dict>" if isinstance(source, Mapping) else str(source)
    raw = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else read_json(source)
    blocks = {name: raw.pop(name, None) for name in EXTENSION_BLOCKS}
    try:
        return DsPldConfig(
            deepspeed=raw,
            pld=PLDConfig.from_dict(blocks["progressive_layer_drop"]),
            earlybert=EarlyBertConfig.from_dict(blocks["earlybert"]),
            model=None if blocks["model"] is None else build_bert_config(blocks["model"]),
            data=DataConfig.from_dict(blocks["data"]),
            lr_schedule=LRScheduleConfig.from_dict(blocks["lr_schedule"]),
            training=TrainingConfig.from_dict(blocks["training"]),
            wandb=WandbConfig.from_dict(blocks["wandb"]),
            source=where,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
