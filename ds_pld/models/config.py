"""Model shape presets and the `model` config, parsed once into a typed object."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from ds_pld.config_errors import Bool, ConfigError, Float, Int, Str, config_block, one_of, parse_block
from ds_pld.kernels import BACKENDS

BLOCK = "model"
Size = Annotated[Int, Field(gt=0)]
Dropout = Annotated[Float, Field(ge=0.0, lt=1.0)]
Widths = tuple[Annotated[Int, Field(ge=0)], ...]
# "pre": the pre-LN layer PLD was designed for (the default); "post": the original BERT layer, as a baseline.
LAYER_NORMS = ("pre", "post")
# Why PLD refuses a post-LN model (at config parse, in ds_pld.initialize and in the model's forward).
PLD_NEEDS_PRE_LN = ("PLD's switchable layer (a residual branch skipped as an identity, kept branches scaled by 1/p) "
                    "is the pre-LN layer of the paper; a post-LN layer normalizes the residual stream itself, so it "
                    "cannot be dropped that way. Set 'model.layer_norm' to \"pre\" or disable "
                    "'progressive_layer_drop'")

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


@config_block
class BertConfig:
    """Shape and behaviour of the BERT: pre-LN (default) or the original post-LN (`layer_norm`).
    `layer_heads`/`layer_intermediate` hold the widths that EarlyBERT kept in each layer (None: every layer has
    `num_heads` heads and `intermediate_size` FFN neurons)."""

    vocab_size: Size = 30522
    hidden_size: Size = 768
    num_layers: Size = 12
    num_heads: Size = 12
    intermediate_size: Size = 3072
    max_position_embeddings: Size = 512
    type_vocab_size: Size = 2
    hidden_dropout: Dropout = 0.1
    attention_dropout: Dropout = 0.1
    layer_norm_eps: Annotated[Float, Field(gt=0.0)] = 1e-12
    initializer_range: Annotated[Float, Field(ge=0.0)] = 0.02
    pad_token_id: Annotated[Int, Field(ge=0)] = 0
    next_sentence_head: Bool = False
    gradient_checkpointing: Bool = False
    kernels: Annotated[Str, AfterValidator(one_of(BACKENDS))] = "auto"
    layer_norm: Annotated[Str, AfterValidator(one_of(LAYER_NORMS))] = "pre"
    slimming: Bool = False
    layer_heads: Widths | None = None
    layer_intermediate: Widths | None = None

    # Cross-field checks sit on the later field, so pydantic reports them under that key (fields validate in order).
    @field_validator("num_heads")
    @classmethod
    def _divides_hidden_size(cls, value: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % value:
            raise ValueError(f"must divide hidden_size = {hidden}")
        return value

    @field_validator("layer_heads", "layer_intermediate")
    @classmethod
    def _one_width_per_layer(cls, value: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        full = info.data.get("num_heads" if info.field_name == "layer_heads" else "intermediate_size")
        layers = info.data.get("num_layers")
        if value is None or full is None or layers is None:
            return value
        if len(value) != layers or any(width > full for width in value):
            raise ValueError(f"must list {layers} widths in [0, {full}]")
        if info.field_name == "layer_heads" and 0 in value:
            raise ValueError("leaves a layer without heads: every layer needs at least one")
        return value

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
        """A copy with `changes`, validated like the config file (a bad width is a ConfigError naming the key)."""
        return parse_block(BertConfig, {**self.to_dict(), **changes}, BLOCK)


def build_bert_config(spec: str | Mapping[str, Any] | BertConfig, **overrides: Any) -> BertConfig:
    """A BertConfig from a preset name, or a dict with an optional `preset` key plus field overrides."""
    if isinstance(spec, BertConfig):
        return spec.with_updates(**overrides) if overrides else spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"'{BLOCK}' must be a preset name or a JSON object, got {type(spec).__name__}")
    fields = dict(spec)
    preset = fields.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"'{BLOCK}.preset' = {preset!r} is not one of {sorted(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **fields, **overrides}
    return parse_block(BertConfig, values, BLOCK, also_allowed=("preset",))


@dataclass(frozen=True)
class InitFrom:
    """`model.init_from`: start a fresh run from existing weights (a ds_pld model folder, a DeepSpeed checkpoint
    folder of ours, or a Hugging Face folder; see ds_pld.models.init_from). `model_keys`: the keys the `model` block
    sets itself (a preset counts as setting its widths): the run takes those over the source's config, and a set
    key that fixes the weights' shape must equal the source's."""

    path: str
    model_keys: frozenset[str]


def parse_model_block(block: Any) -> tuple[BertConfig | None, InitFrom | None]:
    """The `model` block: its BertConfig (None without a block) and its `init_from` (None unless set; `null` is
    unset, so `--set model.init_from=null` turns a file's setting off)."""
    if block is None:
        return None, None
    if not isinstance(block, Mapping) or "init_from" not in block:
        return build_bert_config(block), None
    fields = dict(block)
    path = fields.pop("init_from")
    if path is None:
        return build_bert_config(fields), None
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"'{BLOCK}.init_from' must be a folder path (a string), got {path!r}")
    preset = fields.get("preset")
    keys = (set(fields) - {"preset"}) | set(PRESETS.get(preset, {}) if isinstance(preset, str) else {})
    return build_bert_config(fields), InitFrom(path, frozenset(keys))
