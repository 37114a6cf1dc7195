"""Model shape presets and the `model` config, parsed once into a typed object."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from ds_pld.config_errors import ConfigError

PRESETS: dict[str, dict[str, int]] = {
    # CPU-sized models for tests and the quick start.
    "bert-tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "bert-mini": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "bert-small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "bert-medium": dict(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=2048),
    # The paper's models.
    "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "bert-large": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
}


@dataclass(frozen=True)
class BertConfig:
    """Shape and behaviour of the pre-LN BERT. `layer_heads`/`layer_intermediate` hold the widths that EarlyBERT
    kept in each layer (None: every layer has `num_heads` heads and `intermediate_size` FFN neurons)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    next_sentence_head: bool = False
    gradient_checkpointing: bool = False
    kernels: str = "auto"
    slimming: bool = False
    layer_heads: tuple[int, ...] | None = None
    layer_intermediate: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"'model.hidden_size' = {self.hidden_size} is not divisible by "
                              f"'model.num_heads' = {self.num_heads}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"'model.{key}' must be a positive integer, got {getattr(self, key)!r}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"'model.{key}' = {getattr(self, key)} must be in [0, 1)")
        for key, full in (("layer_heads", self.num_heads), ("layer_intermediate", self.intermediate_size)):
            widths = getattr(self, key)
            if widths is None:
                continue
            if len(widths) != self.num_layers or any(not 0 <= w <= full for w in widths):
                raise ConfigError(f"'model.{key}' must list {self.num_layers} widths in [0, {full}], got {widths}")
        if self.layer_heads is not None and 0 in self.layer_heads:
            raise ConfigError(f"'model.layer_heads' = {self.layer_heads}: every layer needs at least one head")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def heads(self, layer: int) -> int:
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def intermediate(self, layer: int) -> int:
        return self.intermediate_size if self.layer_intermediate is None else self.layer_intermediate[layer]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("layer_heads", "layer_intermediate"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def with_updates(self, **changes: Any) -> BertConfig:
        return replace(self, **changes)


def build_bert_config(spec: str | Mapping[str, Any] | BertConfig, **overrides: Any) -> BertConfig:
    """A BertConfig from a preset name, or a dict with an optional `preset` key plus field overrides."""
    if isinstance(spec, BertConfig):
        return spec.with_updates(**overrides) if overrides else spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    fields = dict(spec)
    preset = fields.pop("preset", None)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"'model.preset' = {preset!r} is not one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(fields)
    values.update(overrides)
    known = set(BertConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in 'model'; allowed: preset, {', '.join(sorted(known))}")
    for key in ("layer_heads", "layer_intermediate"):
        if values.get(key) is not None:
            values[key] = tuple(int(w) for w in values[key])
    return BertConfig(**values)
