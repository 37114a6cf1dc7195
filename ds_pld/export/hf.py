"""Export to a Hugging Face `RobertaPreLayerNormForMaskedLM` folder (config.json, model.safetensors, tokenizer files),
loadable offline with `AutoModelForMaskedLM` / `AutoModelForSequenceClassification.from_pretrained(folder)`.

RoBERTa-PreLayerNorm has our structure: embeddings (word + position + token type, LayerNorm), pre-LN layers
(`attention.LayerNorm` -> q/k/v -> `attention.output.dense` + residual; `intermediate.LayerNorm` -> dense -> exact GELU
-> `output.dense` + residual), a final `LayerNorm`, and the LM head dense -> GELU -> layer_norm -> decoder (tied to the
word embeddings) + bias. Two differences are absorbed in the weights:

* positions: RoBERTa numbers attended tokens from pad_token_id + 1 (padding keeps pad_token_id), we from 0, so our
  table is written shifted by pad_token_id + 1 rows and `max_position_embeddings` grows by as much. With right padding
  the attended positions then see exactly our embeddings.
* EarlyBERT-pruned layers: transformers needs one width for every layer, so pruned heads and neurons are written as
  zeros in the full-size layer: q/k/v rows (a zero q/k head attends uniformly, so v must be zero too) and the output
  projection's columns of a pruned head, the FFN input rows / bias and output columns of a pruned neuron. Slimming
  coefficients are folded into the output projections. The full-size model then computes the same function.

Only pre-LN models are exported: a post-LN model (`model.layer_norm` = "post") would need `BertForMaskedLM`, which
is not written yet, and is refused with a ConfigError. `ds_pld.models.hf_import.import_hf` is the inverse (it reads
`BertForMaskedLM` into a post-LN model too); `--init_from` a folder written here starts a run from it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

from ds_pld.config_errors import ConfigError
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import BertConfig
from ds_pld.models.hf_import import LAYER_NORM_NAMES, PREFIX, roberta_position_offset
from ds_pld.models.io import load_pretrained


def position_offset(config: BertConfig) -> int:
    """Rows in front of our position table in the exported one: RoBERTa's first position id."""
    return roberta_position_offset(config.pad_token_id)


def hf_config(config: BertConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> RobertaPreLayerNormConfig:
    """The transformers config of the exported model (full widths; see the module docstring for positions)."""
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    return RobertaPreLayerNormConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings + position_offset(config),
        type_vocab_size=config.type_vocab_size, initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id, tie_word_embeddings=True,
        architectures=["RobertaPreLayerNormForMaskedLM"], **special)


def _layer_state(state: dict[str, torch.Tensor], i: int, config: BertConfig) -> dict[str, torch.Tensor]:
    """One layer in transformers' names and full widths: the kept heads / neurons first, zeros after them."""
    src = f"encoder.layers.{i}."
    dst = f"{PREFIX}encoder.layer.{i}."
    hidden, head_dim = config.hidden_size, config.head_dim
    heads, full_heads = config.heads(i), config.num_heads
    neurons, full_neurons = config.intermediate(i), config.intermediate_size
    kept, full = heads * head_dim, full_heads * head_dim
    qkv_w = state[src + "qkv.weight"].reshape(3, kept, hidden)
    qkv_b = state[src + "qkv.bias"].reshape(3, kept)
    attn_out = state[src + "attn_out.weight"]
    ffn_out = state[src + "ffn_out.weight"]
    if src + "head_coef" in state:
        attn_out = attn_out * state[src + "head_coef"].repeat_interleave(head_dim).view(1, kept)
    if src + "ffn_coef" in state:
        ffn_out = ffn_out * state[src + "ffn_coef"].view(1, neurons)
    out = {}
    for j, name in enumerate(("query", "key", "value")):
        weight, bias = torch.zeros(full, hidden), torch.zeros(full)
        weight[:kept], bias[:kept] = qkv_w[j], qkv_b[j]
        out[f"{dst}attention.self.{name}.weight"], out[f"{dst}attention.self.{name}.bias"] = weight, bias
    out[f"{dst}attention.output.dense.weight"] = torch.zeros(hidden, full)
    out[f"{dst}attention.output.dense.weight"][:, :kept] = attn_out
    out[f"{dst}attention.output.dense.bias"] = state[src + "attn_out.bias"]
    out[f"{dst}intermediate.dense.weight"] = torch.zeros(full_neurons, hidden)
    out[f"{dst}intermediate.dense.weight"][:neurons] = state[src + "ffn_in.weight"]
    out[f"{dst}intermediate.dense.bias"] = torch.zeros(full_neurons)
    out[f"{dst}intermediate.dense.bias"][:neurons] = state[src + "ffn_in.bias"]
    out[f"{dst}output.dense.weight"] = torch.zeros(hidden, full_neurons)
    out[f"{dst}output.dense.weight"][:, :neurons] = ffn_out
    out[f"{dst}output.dense.bias"] = state[src + "ffn_out.bias"]
    for ours, theirs in LAYER_NORM_NAMES["pre"].items():
        out[f"{dst}{theirs}.weight"] = state[f"{src}{ours}.weight"]
        out[f"{dst}{theirs}.bias"] = state[f"{src}{ours}.bias"]
    return out


def check_exportable(config: BertConfig) -> None:
    """RobertaPreLayerNorm has pre-LN layers and a final LayerNorm; a post-LN model would compute something else."""
    if config.layer_norm != "pre":
        raise ConfigError(f"export of a post-LN model ('model.layer_norm' = {config.layer_norm!r}) is not supported "
                          "yet: the export writes RobertaPreLayerNormForMaskedLM (pre-LN); a post-LN model would need "
                          "BertForMaskedLM")


def hf_state_dict(model: BertForPreTraining) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, fp32 on the CPU (the NSP head, if any, has no counterpart)."""
    config = model.config
    check_exportable(config)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    offset = position_offset(config)
    positions = torch.zeros(config.max_position_embeddings + offset, config.hidden_size)
    positions[offset:] = state["embeddings.position.weight"]
    word = state["embeddings.word.weight"]
    out = {
        f"{PREFIX}embeddings.word_embeddings.weight": word,
        f"{PREFIX}embeddings.position_embeddings.weight": positions,
        f"{PREFIX}embeddings.token_type_embeddings.weight": state["embeddings.token_type.weight"],
        f"{PREFIX}embeddings.LayerNorm.weight": state["embeddings.norm.weight"],
        f"{PREFIX}embeddings.LayerNorm.bias": state["embeddings.norm.bias"],
        f"{PREFIX}LayerNorm.weight": state["encoder.final_norm.weight"],
        f"{PREFIX}LayerNorm.bias": state["encoder.final_norm.bias"],
        "lm_head.dense.weight": state["mlm.dense.weight"],
        "lm_head.dense.bias": state["mlm.dense.bias"],
        "lm_head.layer_norm.weight": state["mlm.norm.weight"],
        "lm_head.layer_norm.bias": state["mlm.norm.bias"],
        "lm_head.bias": state["mlm.bias"],
        "lm_head.decoder.weight": word,
        "lm_head.decoder.bias": state["mlm.bias"],
    }
    for i in range(config.num_layers):
        out.update(_layer_state(state, i, config))
    return out


def to_hf_model(model: BertForPreTraining, tokenizer: PreTrainedTokenizerBase | None = None
                ) -> RobertaPreLayerNormForMaskedLM:
    """The transformers model computing what `model` computes (in eval mode, on right-padded inputs)."""
    check_exportable(model.config)
    hf = RobertaPreLayerNormForMaskedLM(hf_config(model.config, tokenizer))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()


def _load_tokenizer(spec: PreTrainedTokenizerBase | str | Path | None, model_path: Path | None
                    ) -> PreTrainedTokenizerBase | None:
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if spec is None and model_path is not None:
        from ds_pld.models.io import find_tokenizer

        spec = find_tokenizer(model_path)
    if spec is None:
        return None
    from ds_pld.data.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def check_export_tokenizer(config: BertConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """The exported model must be used with the tokenizer it was trained with."""
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                          f"{config.vocab_size}; pass the tokenizer the model was pretrained with")
    if tokenizer.pad_token_id != config.pad_token_id:
        raise ConfigError(f"the tokenizer's pad token id {tokenizer.pad_token_id} is not the model's "
                          f"'pad_token_id' {config.pad_token_id}")
    if tokenizer.padding_side != "right":
        raise ConfigError("the tokenizer pads on the left; the exported positions are exact for right padding")


def check_finite_weights(model: BertForPreTraining, source: Path | None = None) -> None:
    """A diverged run's weights are NaN; exported, they would load fine and predict garbage, so refuse them."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        where = f"model '{source}'" if source is not None else "the model"
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(f"{where} has non-finite (NaN/inf) weights in {bad[:3]}{more}: the run diverged; "
                          "export a checkpoint from before the divergence")


def export_hf(model: BertForPreTraining | str | Path, output_dir: str | Path,
              tokenizer: PreTrainedTokenizerBase | str | Path | None = None) -> Path:
    """Write the transformers folder. `model`: a model, a save_pretrained folder or a DeepSpeed checkpoint folder;
    `tokenizer`: a tokenizer or its folder (default: the one saved beside the model). A model without a tokenizer
    is exported without tokenizer files."""
    model_path = None if isinstance(model, BertForPreTraining) else Path(model)
    if model_path is not None:
        if not model_path.exists():
            raise ConfigError(f"model '{model_path}' does not exist")
        model = load_pretrained(model_path)
    check_exportable(model.config)
    check_finite_weights(model, model_path)
    tok = _load_tokenizer(tokenizer, model_path)
    if tok is not None:
        check_export_tokenizer(model.config, tok)
    output_dir = Path(output_dir)
    to_hf_model(model, tok).save_pretrained(str(output_dir))
    if tok is not None:
        save_tokenizer(tok, output_dir, model.config.max_position_embeddings)
    return output_dir


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, output_dir: Path, max_length: int) -> None:
    """The tokenizer files, with what the exported model needs recorded in tokenizer_config.json: segment ids among
    the model inputs (transformers 5 leaves them out by default, and pairs would then lose segment B's embedding)
    and a maximum length that fits the position table."""
    tokenizer.save_pretrained(str(output_dir))
    config_file = output_dir / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    settings["model_max_length"] = min(int(settings.get("model_max_length") or max_length), max_length)
    settings["padding_side"] = "right"
    config_file.write_text(json.dumps(settings, indent=2))


@torch.no_grad()
def max_output_difference(model: BertForPreTraining, hf: Any, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> float:
    """Largest |ours - transformers'| over hidden states and MLM logits at attended positions (right padding)."""
    model.eval()
    ours = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    hidden_states = hf.base_model(**inputs).last_hidden_state  # after the final LayerNorm, like ours
    logits = hf(**inputs).logits
    keep = attention_mask.bool()
    hidden = (ours.hidden_states[keep] - hidden_states[keep]).abs().max()
    logits = (ours.logits[keep] - logits[keep]).abs().max()
    return float(max(hidden, logits))
