"""One place where a ds_configs JSON is read, our blocks are validated and removed, and the rest goes to DeepSpeed."""
from __future__ import annotations

import copy
import difflib
import json
from collections.abc import KeysView, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.models.config import BertConfig, build_bert_config
from ds_pld.pld import PLDConfig
from ds_pld.training.config import DataConfig, LRScheduleConfig, TrainingConfig, WandbConfig

EXTENSION_BLOCKS = ("progressive_layer_drop", "earlybert", "model", "data", "lr_schedule", "training", "wandb")
# Our blocks read by other entry points (launch/finetune.py removes `glue` before the rest comes here).
OTHER_BLOCKS = ("glue",)
# Read by deepspeed.initialize itself (the sequence-parallel mesh), not by DeepSpeedConfig.
DEEPSPEED_INITIALIZE_KEYS = ("sequence_parallel_size", "data_parallel_size")


class _RecordingDict(dict):
    """A dict that notes every key looked up in it (`get`, `[]`, `in`, `in .keys()`), shared with its copies."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.looked_up: set[str] = set()

    def get(self, key: Any, *default: Any) -> Any:
        self.looked_up.add(key)
        return super().get(key, *default)

    def __getitem__(self, key: Any) -> Any:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self) -> KeysView:  # type: ignore[override]
        return KeysView(self)


def deepspeed_top_level_keys() -> frozenset[str]:
    """The top-level keys this DeepSpeed reads, asked of DeepSpeed itself: its own config class parses a minimal
    config through a dict that records every key looked up. A hand-written list would go stale with each release."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _RecordingDict({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    DeepSpeedConfig(probe)
    return frozenset(key for key in probe.looked_up if isinstance(key, str)) | frozenset(DEEPSPEED_INITIALIZE_KEYS)


def check_top_level_keys(raw: Mapping[str, Any]) -> None:
    """A misspelt DeepSpeed key (`gradient_clippin`) would otherwise be ignored by DeepSpeed without a word."""
    unknown = sorted(set(raw) - set(EXTENSION_BLOCKS) - set(OTHER_BLOCKS) - deepspeed_top_level_keys())
    if unknown:
        known = sorted(deepspeed_top_level_keys() | set(EXTENSION_BLOCKS))
        hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        hint = "; ".join(f"{key!r}: did you mean {match[0]!r}?" for key, match in hints.items() if match)
        raise ConfigError(f"unknown top-level key(s) {unknown}: neither a ds_pld block {list(EXTENSION_BLOCKS)} "
                          f"nor a key DeepSpeed reads{' (' + hint + ')' if hint else ''}")


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
    try:
        check_top_level_keys(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
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
