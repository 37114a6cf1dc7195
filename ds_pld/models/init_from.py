"""Starting a run from existing weights (`model.init_from`, `--init_from`): weights only; the optimizer, the
learning-rate schedule, the step count and the data position start fresh.

Sources (`find_source`): a model folder of ours (`final/`, `save_pretrained`), a DeepSpeed checkpoint folder of ours
(any ZeRO stage and world size: the partitions are consolidated by DeepSpeed's zero_to_fp32), or a Hugging Face
folder, `RobertaPreLayerNormForMaskedLM` (what our export writes) or `BertForMaskedLM` (post-LN; see
ds_pld.models.hf_import).

The run's model config (`run_model_config`) is the source's, with the keys the run's `model` block sets itself:
- the keys that fix what the weights compute (`SOURCE_KEYS`: widths, vocabulary, LayerNorm placement and epsilon,
  EarlyBERT's per-layer widths) always come from the source, and a block that sets one to another value is refused
  with one ConfigError naming both values and the source; a pruned model so keeps its widths;
- `max_position_embeddings`, the dropouts and `initializer_range` are the source's unless the block sets them;
- run settings (`RUN_KEYS`: kernels, gradient checkpointing, slimming coefficients, the NSP head) are the run's.

A larger position table (`load_source_weights`) keeps the source's rows and leaves the new rows as the model's own
init draws them (normal, std `initializer_range`): what those rows would hold had the source been trained with the
larger table and never reached those positions, as in BERT's phase 1 (modulo weight decay). Repeating the trained
rows instead (Longformer's choice for its local attention) would give positions 128-255 the embeddings of 0-127, so
an absolute-position model could not tell them apart at the start; random rows are distinct and are learned in
phase 2. A smaller table keeps the first rows. Slimming coefficients of a source that has them are folded into the
output projections when the run has none (exact, as the export does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ds_pld.config_errors import ConfigError, in_source
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import BertConfig, InitFrom, build_bert_config
from ds_pld.models.hf_import import FORMATS, bert_config_from_hf, hf_model_type, import_hf
from ds_pld.models.io import CONFIG_FILE, find_saved, find_tokenizer

KEY = "model.init_from"
# What the source's weights compute: always the source's; a run that sets another value is refused.
SOURCE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "type_vocab_size",
               "layer_heads", "layer_intermediate", "layer_norm", "layer_norm_eps", "pad_token_id")
# How this run trains the model: always the run's.
RUN_KEYS = ("gradient_checkpointing", "kernels", "slimming", "next_sentence_head")
COEFFICIENTS = {"head_coef": "attn_out.weight", "ffn_coef": "ffn_out.weight"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
HF_KINDS = tuple(class_name for class_name, _, _ in FORMATS.values())


@dataclass(frozen=True)
class Source:
    """The model `model.init_from` names, located and described; its weights are read by `state_dict()`."""

    path: Path
    kind: str
    config: BertConfig
    tokenizer: Path | None  # the tokenizer saved with it, if any

    def describe(self) -> str:
        return f"'{self.path}' ({self.kind})"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The source's weights under our names and at its own sizes, fp32 on the CPU."""
        with in_source(f"'{KEY}' = '{self.path}'"):
            if self.kind in HF_KINDS:
                return import_hf(self.path).state_dict()
            return {name: tensor.float() for name, tensor in find_saved(self.path).read_state().items()}


def find_source(path: str | Path) -> Source:
    """Locate and describe the source (configs only; no weights are read)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"'{KEY}' = '{path}' does not exist")
    with in_source(f"'{KEY}' = '{path}'"):
        model_type = hf_model_type(path)
        if model_type is not None and not (path / CONFIG_FILE).is_file():
            if model_type not in FORMATS:
                raise ConfigError(f"a transformers {model_type!r} model; the import reads "
                                  f"{list(HF_KINDS)} (model_type {sorted(FORMATS)})")
            class_name, _, layer_norm = FORMATS[model_type]
            from transformers import AutoConfig

            config = bert_config_from_hf(AutoConfig.from_pretrained(str(path), local_files_only=True), layer_norm)
            tokenizer = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
            return Source(path, class_name, config, tokenizer)
        try:
            saved = find_saved(path)
        except ConfigError:
            hint = next((f" (did you mean '{path / sub}'?)" for sub in ("final", "checkpoints")
                         if (path / sub).is_dir()), "")
            raise ConfigError(f"not a model: expected a ds_pld model folder ({CONFIG_FILE}, e.g. a run's final/), a "
                              f"DeepSpeed checkpoint folder of ds_pld (with 'latest', or one global_step folder), or "
                              f"a Hugging Face folder (config.json) of {' or '.join(HF_KINDS)}{hint}") from None
        return Source(path, saved.kind, build_bert_config(saved.config), find_tokenizer(path))


def run_model_config(source: Source, run: BertConfig, model_keys: frozenset[str]) -> BertConfig:
    """The model config of a run started from `source`; `run`: the run's model config, `model_keys`: the keys its
    block set (see the module docstring)."""
    clashes = [key for key in SOURCE_KEYS if key in model_keys and getattr(run, key) != getattr(source.config, key)]
    if clashes:
        theirs = ", ".join(f"{key} = {getattr(source.config, key)}" for key in clashes)
        mine = ", ".join(f"'model.{key}' = {getattr(run, key)}" for key in clashes)
        raise ConfigError(f"'{KEY}' = {source.describe()} has {theirs}, but the run's config sets {mine}: a run "
                          "started from a model has the model's sizes; remove those keys (or the preset) from "
                          "'model' to take the source's, or start from a model of these sizes")
    changes = {key: getattr(run, key) for key in model_keys if key not in SOURCE_KEYS}
    changes.update({key: getattr(run, key) for key in RUN_KEYS})
    return source.config.with_updates(**changes)


def _fold_coefficients(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], head_dim: int) -> None:
    """Slimming coefficients the run's model has no place for, multiplied into the output projections."""
    for name in [key for key in state if key.rsplit(".", 1)[-1] in COEFFICIENTS and key not in target]:
        prefix, kind = name.rsplit(".", 1)
        coef = state.pop(name)
        if kind == "head_coef":
            coef = coef.repeat_interleave(head_dim)
        weight = f"{prefix}.{COEFFICIENTS[kind]}"
        state[weight] = state[weight] * coef.view(1, -1)


def _fit_positions(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], config: BertConfig,
                   source: Source) -> list[str]:
    """Copy the source's position rows into the model's table (whose other rows keep the model's init)."""
    key = "embeddings.position.weight"
    theirs, mine = state[key], target[key]
    if theirs.shape[0] == mine.shape[0]:
        return []
    rows = min(theirs.shape[0], mine.shape[0])
    table = mine.detach().float().clone()
    table[:rows] = theirs[:rows]
    state[key] = table
    if mine.shape[0] > theirs.shape[0]:
        return [f"{KEY}: position embeddings grown from {theirs.shape[0]} to {mine.shape[0]} rows: rows "
                f"0-{rows - 1} from {source.describe()}, rows {rows}-{mine.shape[0] - 1} initialized as the model's "
                f"init does (normal, std {config.initializer_range})"]
    return [f"{KEY}: position embeddings cut from {theirs.shape[0]} to {mine.shape[0]} rows (the first "
            f"{rows} kept) from {source.describe()}"]


def load_source_weights(model: BertForPreTraining, source: Source) -> list[str]:
    """Load the source's weights into `model` (built from `run_model_config`); returns the notices to print once
    (position table resized, heads or coefficients dropped)."""
    state = source.state_dict()
    target = model.state_dict()
    notes = _fit_positions(state, target, model.config, source)
    _fold_coefficients(state, target, model.config.head_dim)
    unused = sorted(key for key in state if key.startswith(("pooler.", "nsp.")) and key not in target)
    for key in unused:
        del state[key]
    if unused:
        notes.append(f"{KEY}: the source's next-sentence head ({', '.join(unused)}) is not used by this run")
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}" for key in state
             if key in target and state[key].shape != target[key].shape]
    unexpected = sorted(set(state) - set(target))
    missing = sorted(key for key in set(target) - set(state)
                     if key.rsplit(".", 1)[-1] not in COEFFICIENTS and not key.startswith(("pooler.", "nsp.")))
    if wrong or unexpected or missing:
        raise ConfigError(f"'{KEY}' = {source.describe()}: its weights do not fit the run's model (shape "
                          f"{wrong}, unexpected {unexpected}, missing {missing})")
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.copy_(state[name].to(param.dtype))
    return notes


def initial_model(run: BertConfig, init: InitFrom) -> tuple[BertForPreTraining, list[str]]:
    """The model of a fresh run whose `model` block is `run` with `init_from` = `init`, and the notices to print."""
    source = find_source(init.path)
    model = BertForPreTraining(run_model_config(source, run, init.model_keys))
    return model, load_source_weights(model, source)
