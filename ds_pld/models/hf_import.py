"""Import from a Hugging Face folder: `RobertaPreLayerNormForMaskedLM` (what `ds_pld.export.hf` writes) into our pre-LN
model, and transformers' `BertForMaskedLM` (the shape of the released BERT checkpoints; `BertForPreTraining` folders
load too, their pooler and next-sentence head left out) into our post-LN model (`layer_norm="post"`).

The pre-LN import is the exact inverse of the export:

* positions: RoBERTa numbers attended tokens from pad_token_id + 1, we from 0, so the first pad_token_id + 1 rows of
  its table (never read for attended tokens) are dropped and `max_position_embeddings` shrinks by as much. BERT
  numbers positions from 0, as we do: its table is taken as it is.
* widths: transformers has one width for every layer, so an EarlyBERT-pruned model comes back at full width with
  its pruned heads and neurons as the zeros the export wrote (slimming coefficients were folded into the output
  projections there). The zero units contribute nothing, so the full-width model computes the same function as the
  pruned one; it is not re-pruned (`BertConfig.layer_heads` is None), and training it updates the zero units too.

The folder is read with transformers' own `from_pretrained` (local files only), so safetensors and `.bin` weights,
sharded files and old parameter names (LayerNorm `gamma`/`beta`) all load. Models that compute something else
(another activation than exact GELU, relative position embeddings, a decoder, an MLM decoder not tied to the word
embeddings) are refused with a ConfigError naming the setting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ds_pld.config_errors import ConfigError
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import BertConfig, build_bert_config

HF_CONFIG_FILE = "config.json"
# model_type in config.json -> (transformers class we read it with, base-model prefix, our layer_norm)
FORMATS = {"roberta-prelayernorm": ("RobertaPreLayerNormForMaskedLM", "roberta_prelayernorm.", "pre"),
           "bert": ("BertForMaskedLM", "bert.", "post")}
PREFIX = FORMATS["roberta-prelayernorm"][1]
# Our per-layer LayerNorms under transformers' names: pre-LN normalizes each branch's input, post-LN its output.
LAYER_NORM_NAMES = {"pre": {"attn_norm": "attention.LayerNorm", "ffn_norm": "intermediate.LayerNorm"},
                    "post": {"attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}}
LINEAR_NAMES = {"attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
QKV_NAMES = ("query", "key", "value")


def roberta_position_offset(pad_token_id: int) -> int:
    """Rows in front of our position table in RoBERTa's: its first position id."""
    return pad_token_id + 1


def hf_model_type(folder: str | Path) -> str | None:
    """`model_type` of a transformers folder (its config.json), or None when `folder` has no config.json."""
    path = Path(folder) / HF_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["model_type"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"'{path}' is not a transformers config (no model_type): {err}") from None


def _checked(hf_config: Any, folder: Path) -> None:
    """Refuse what our model would compute differently."""
    where = f"'{folder / HF_CONFIG_FILE}'"
    settings = {"hidden_act": (getattr(hf_config, "hidden_act", "gelu"), "gelu"),
                "position_embedding_type": (getattr(hf_config, "position_embedding_type", "absolute"), "absolute"),
                "is_decoder": (bool(getattr(hf_config, "is_decoder", False)), False),
                "add_cross_attention": (bool(getattr(hf_config, "add_cross_attention", False)), False)}
    for key, (value, wanted) in settings.items():
        if value != wanted:
            raise ConfigError(f"{where} has {key} = {value!r}; the import needs {wanted!r} (our model computes that "
                              "only)")
    if hf_config.hidden_size % hf_config.num_attention_heads:
        raise ConfigError(f"{where}: num_attention_heads = {hf_config.num_attention_heads} does not divide "
                          f"hidden_size = {hf_config.hidden_size}")


def bert_config_from_hf(hf_config: Any, layer_norm: str) -> BertConfig:
    """Our config of a transformers RobertaPreLayerNorm ("pre") or BERT ("post") config."""
    pad = int(hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)
    offset = roberta_position_offset(pad) if layer_norm == "pre" else 0
    if hf_config.max_position_embeddings <= offset:
        raise ConfigError(f"max_position_embeddings = {hf_config.max_position_embeddings} leaves no position after "
                          f"RoBERTa's {offset} reserved rows")
    return build_bert_config({
        "vocab_size": hf_config.vocab_size, "hidden_size": hf_config.hidden_size,
        "num_layers": hf_config.num_hidden_layers, "num_heads": hf_config.num_attention_heads,
        "intermediate_size": hf_config.intermediate_size,
        "max_position_embeddings": hf_config.max_position_embeddings - offset,
        "type_vocab_size": hf_config.type_vocab_size, "hidden_dropout": float(hf_config.hidden_dropout_prob),
        "attention_dropout": float(hf_config.attention_probs_dropout_prob),
        "layer_norm_eps": float(hf_config.layer_norm_eps), "initializer_range": float(hf_config.initializer_range),
        "pad_token_id": pad, "layer_norm": layer_norm})


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: BertConfig, prefix: str
                       ) -> dict[str, torch.Tensor]:
    """Our state dict of a transformers MLM state dict (RobertaPreLayerNorm when `config.layer_norm` is "pre",
    BERT when "post"); `prefix` is the base model's ("roberta_prelayernorm." or "bert.")."""
    state = {name: tensor.detach().float().cpu() for name, tensor in hf_state.items()}
    pre = config.layer_norm == "pre"
    head = "lm_head." if pre else "cls.predictions."
    transform = head if pre else f"{head}transform."
    word = state[f"{prefix}embeddings.word_embeddings.weight"]
    decoder = state.get(f"{head}decoder.weight")
    if decoder is not None and not torch.equal(decoder, word):
        raise ConfigError("the MLM decoder is not tied to the word embeddings; our model ties them "
                          "(tie_word_embeddings must be true)")
    positions = state[f"{prefix}embeddings.position_embeddings.weight"]
    out = {
        "embeddings.word.weight": word,
        "embeddings.position.weight": positions[roberta_position_offset(config.pad_token_id):] if pre else positions,
        "embeddings.token_type.weight": state[f"{prefix}embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": state[f"{prefix}embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": state[f"{prefix}embeddings.LayerNorm.bias"],
        "mlm.dense.weight": state[f"{transform}dense.weight"],
        "mlm.dense.bias": state[f"{transform}dense.bias"],
        "mlm.norm.weight": state[f"{transform}{'layer_norm' if pre else 'LayerNorm'}.weight"],
        "mlm.norm.bias": state[f"{transform}{'layer_norm' if pre else 'LayerNorm'}.bias"],
        "mlm.bias": state[f"{head}bias"],
    }
    if pre:
        out["encoder.final_norm.weight"] = state[f"{prefix}LayerNorm.weight"]
        out["encoder.final_norm.bias"] = state[f"{prefix}LayerNorm.bias"]
    names = {**LINEAR_NAMES, **LAYER_NORM_NAMES[config.layer_norm]}
    for i in range(config.num_layers):
        src, dst = f"{prefix}encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}qkv.{kind}"] = torch.cat([state[f"{src}attention.self.{name}.{kind}"] for name in QKV_NAMES])
            for ours, theirs in names.items():
                out[f"{dst}{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    return out


def import_hf(folder: str | Path) -> BertForPreTraining:
    """Our model (full width, eval-equivalent) from a transformers folder holding a `RobertaPreLayerNormForMaskedLM`
    (pre-LN) or a `BertForMaskedLM` (post-LN); see the module docstring."""
    import transformers

    folder = Path(folder)
    model_type = hf_model_type(folder)
    if model_type not in FORMATS:
        raise ConfigError(f"'{folder}' holds a transformers {model_type!r} model; the import reads "
                          f"{[cls for cls, _, _ in FORMATS.values()]} (model_type {sorted(FORMATS)})")
    class_name, prefix, layer_norm = FORMATS[model_type]
    model_class = getattr(transformers, class_name)
    hf_config = model_class.config_class.from_pretrained(str(folder), local_files_only=True)
    _checked(hf_config, folder)
    try:
        hf = model_class.from_pretrained(str(folder), config=hf_config, local_files_only=True)
    except OSError as err:
        raise ConfigError(f"'{folder}': transformers could not load its {class_name} weights: {err}") from None
    config = bert_config_from_hf(hf_config, layer_norm)
    model = BertForPreTraining(config)
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), config, prefix), strict=True)
    return model
