"""The plugin's config: a DeepSpeed config (JSON file or dict) plus our core blocks, parsed once.

`ds_pld.initialize` needs `progressive_layer_drop`; `earlybert` and `model` are parsed here too because their owners
(ds_pld.earlybert, ds_pld.models) are core packages. The blocks of ds_pld's own applications (the pretraining
trainer's `data`, `lr_schedule`, `training`, `wandb`, fine-tuning's `glue`) are parsed by their owners
(ds_pld.training.config, ds_pld.glue.config); here they are only known by name, so one file serves the trainer and
`ds_pld.initialize` alike while the core imports nothing from the applications. Every other top-level key must be
one DeepSpeed reads. Command-line overrides (`--set key.path=value`) are merged into the dict before parsing.
"""
from __future__ import annotations

import copy
import json
from collections.abc import KeysView, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError, did_you_mean, in_source
from ds_pld.earlybert.config import EarlyBertConfig
from ds_pld.models.config import PLD_NEEDS_PRE_LN, BertConfig, InitFrom, parse_model_block
from ds_pld.pld import PLDConfig
from ds_pld.random_ltd import RandomLTDConfig

PLUGIN_BLOCKS = ("progressive_layer_drop", "earlybert", "model")
APPLICATION_BLOCKS = ("data", "lr_schedule", "training", "wandb", "glue")
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
    ours = (*PLUGIN_BLOCKS, *APPLICATION_BLOCKS)
    known = deepspeed_top_level_keys() | set(ours)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}: neither a ds_pld block {list(ours)} nor a key "
                          f"DeepSpeed reads{did_you_mean(unknown, known)}")


class NamedConfig(dict):
    """A config dict that remembers where it came from (a file, plus command-line overrides): errors found after
    the overrides are merged still name the file."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        super().__init__(data)
        self.source = source


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


def load_config_dict(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(a private copy of the config, the name errors give it: the file, or '<dict>')."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), getattr(source, "source", "<dict>")
    return read_json(source), str(source)


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key.path, value): the value is JSON when it parses (`4`, `true`, `[1, 2]`, `null`),
    else the plain string (`bert-tiny`, `/data/x`)."""
    key, sep, value = text.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. training.max_steps=100")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    """config['a']['b'] = value for 'a.b', creating missing blocks and keeping the block's other keys."""
    *parents, last = dotted.split(".")
    node = config
    for depth, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parents[:depth + 1])}' is not a JSON object")
    node[last] = value


def with_overrides(source: str | Path | Mapping[str, Any], overrides: Sequence[tuple[str, Any]]) -> NamedConfig:
    """The config with each (dotted key, value) merged in, in order (a later one wins); errors name the source and
    the overridden keys."""
    raw, where = load_config_dict(source)
    for key, value in overrides:
        set_key(raw, key, value)
    keys = ", ".join(dict.fromkeys(key for key, _ in overrides))
    return NamedConfig(raw, f"{where} (overrides: {keys})" if keys else where)


@dataclass(frozen=True)
class DsPldConfig:
    """The core blocks as typed objects, plus `deepspeed`: the dict DeepSpeed receives (all our blocks removed).
    The trainer's run config (ds_pld.training.config.RunConfig) extends it with the trainer's blocks. `init_from`:
    the `model` block's `init_from` (weights to start from), parsed apart from the model's shape."""

    deepspeed: dict[str, Any]
    pld: PLDConfig = field(default_factory=PLDConfig)
    earlybert: EarlyBertConfig | None = None
    model: BertConfig | None = None
    source: str = "<dict>"
    init_from: InitFrom | None = None
    random_ltd: RandomLTDConfig | None = None  # DeepSpeed's `data_efficiency.data_routing.random_ltd`, when on


def parse_config(source: str | Path | Mapping[str, Any] | DsPldConfig) -> DsPldConfig:
    """Parse a config path or dict once; every error names the key (and the file when there is one). The
    applications' blocks are removed unparsed (their owners parse them); unknown top-level keys are errors."""
    if isinstance(source, DsPldConfig):
        return source
    raw, where = load_config_dict(source)
    with in_source(where):
        check_top_level_keys(raw)
        blocks = {name: raw.pop(name, None) for name in (*PLUGIN_BLOCKS, *APPLICATION_BLOCKS)}
        pld = PLDConfig.from_dict(blocks["progressive_layer_drop"])
        model, init_from = parse_model_block(blocks["model"])
        if pld.enabled and model is not None and model.layer_norm == "post":
            raise ConfigError(f"'progressive_layer_drop' is enabled with 'model.layer_norm' = \"post\": "
                              f"{PLD_NEEDS_PRE_LN}")
        random_ltd = RandomLTDConfig.from_deepspeed(raw)
        if random_ltd is not None and model is not None:
            random_ltd.check_model(model.num_layers)
        return DsPldConfig(
            deepspeed=raw,
            pld=pld,
            earlybert=EarlyBertConfig.from_dict(blocks["earlybert"]),
            model=model,
            source=where,
            init_from=init_from,
            random_ltd=random_ltd,
        )
