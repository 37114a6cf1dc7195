"""A pretraining run's inputs: the packed dataset (prepared on first use), the model config it fits, and the
masked batches drawn from it with seeds that depend on their position only."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed import comm as dist

from ds_pld.config_errors import ConfigError
from ds_pld.data import MLMMasker, PretrainingData, check_seq_length, load_pretraining_data, prepare_dataset
from ds_pld.data.tokenizer import load_tokenizer
from ds_pld.models import BertConfig, build_bert_config
from ds_pld.models.config import PLD_NEEDS_PRE_LN
from ds_pld.models.init_from import Source, find_source, run_model_config
from ds_pld.training.config import RunConfig


def load_data(config: RunConfig, output_dir: Path, rank: int, source: Source | None = None,
              started_from: str | None = None) -> PretrainingData:
    """`data.path`, or a dataset rank 0 prepares from `data.corpus` into `<output_dir>/data`; the tokenizer is saved
    beside the run's outputs. A run started from a model (`source` on its first start; `started_from`, the model's
    folder, on every start) prepares its corpus with the model's tokenizer unless `data.tokenizer` names one, and
    on its first start its data must use the model's vocabulary."""
    data = config.data
    path = Path(data.path) if data.path else output_dir / "data"
    tokenizer = data.tokenizer
    if started_from is not None and not data.path and tokenizer is None:
        tokenizer = str(model_tokenizer(source, started_from, output_dir))
    if not data.path and rank == 0:
        prepare_dataset(path, corpus_files=list(data.corpus) or None, tokenizer=tokenizer,
                        max_seq_length=data.max_seq_length, vocab_size=data.vocab_size,
                        validation_fraction=data.validation_fraction, seed=config.training.seed,
                        encoding_errors=data.encoding_errors)
    dist.barrier()
    loaded = load_pretraining_data(path)
    if data.train_sequences is not None:
        available = len(loaded.train)
        if data.train_sequences > available:
            raise ConfigError(f"'data.train_sequences' = {data.train_sequences} exceeds the {available} training "
                              f"sequences in '{loaded.path}'")
        loaded = dataclasses.replace(loaded, train=loaded.train.select(range(data.train_sequences)))
    if source is not None:
        check_source_vocabulary(source, loaded)
    if rank == 0:
        loaded.tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    return loaded


def model_tokenizer(source: Source | None, started_from: str, output_dir: Path) -> Path:
    """The tokenizer of the model a run started from: the one saved with `source` on the first start; on a resume
    the same one again (so the prepared data is found by its fingerprint), or the copy in `<output_dir>/tokenizer`
    when the model's folder is gone."""
    if source is None:
        if Path(started_from).exists():
            source = find_source(started_from)
        if source is None or source.tokenizer is None:
            return output_dir / "tokenizer"
    if source.tokenizer is None:
        raise ConfigError(f"'model.init_from' = {source.describe()} has no tokenizer saved with it and "
                          "'data.tokenizer' is not set: preparing the corpus would train a new vocabulary that "
                          "does not match the model's embeddings; set 'data.tokenizer' to the model's tokenizer")
    return source.tokenizer


def check_source_vocabulary(source: Source, data: PretrainingData) -> None:
    """The data's token ids must index the source model's embeddings, with the source's meaning."""
    if data.vocab_size > source.config.vocab_size:
        raise ConfigError(f"'model.init_from' = {source.describe()} has a vocabulary of {source.config.vocab_size} "
                          f"tokens, but the data in '{data.path}' was tokenized with {data.vocab_size}: prepare the "
                          "data with the model's tokenizer ('data.tokenizer' or prepare_data.py --tokenizer)")
    if source.tokenizer is not None and data.tokenizer.get_vocab() != load_tokenizer(source.tokenizer).get_vocab():
        raise ConfigError(f"the data in '{data.path}' was tokenized with another vocabulary than the one saved with "
                          f"'model.init_from' = {source.describe()} ('{source.tokenizer}'): its token ids would mean "
                          "other words; prepare the data with that tokenizer ('data.tokenizer' or prepare_data.py "
                          "--tokenizer)")


def model_config(config: RunConfig, data: PretrainingData, meta: dict[str, Any] | None,
                 source: Source | None = None) -> BertConfig:
    """The checkpoint's model config when resuming (it may be EarlyBERT-pruned); for a run started from `source`
    (`model.init_from`), the source's with the keys the config's `model` block sets (ds_pld.models.init_from);
    else the config's, sized to the data's vocabulary. With slimming coefficients when EarlyBERT searches."""
    if meta is not None:
        return build_bert_config(meta["model_config"])
    spec = config.model or build_bert_config("bert-base")
    overrides: dict[str, Any] = {"vocab_size": data.vocab_size, "pad_token_id": data.tokenizer.pad_token_id}
    if config.earlybert is not None:
        overrides["slimming"] = True
    if source is None:
        model = spec.with_updates(**overrides)
    else:
        model = run_model_config(source, spec.with_updates(slimming=overrides.get("slimming", False)),
                                 config.init_from.model_keys)
        if config.pld.enabled and model.layer_norm == "post":
            raise ConfigError(f"'model.init_from' = {source.describe()} is a post-LN model and "
                              f"'progressive_layer_drop' is enabled: {PLD_NEEDS_PRE_LN}")
        if model.pad_token_id != data.tokenizer.pad_token_id:
            raise ConfigError(f"'model.init_from' = {source.describe()} pads with token id {model.pad_token_id}, "
                              f"the data's tokenizer with {data.tokenizer.pad_token_id}: use the model's tokenizer")
        if data.max_seq_length > model.max_position_embeddings:
            raise ConfigError(f"'data.max_seq_length' = {data.max_seq_length} exceeds the "
                              f"{model.max_position_embeddings} positions of 'model.init_from' = {source.describe()}: "
                              f"set 'model.max_position_embeddings' to {data.max_seq_length} or more to grow its table")
    check_seq_length(data.max_seq_length, model.max_position_embeddings)
    return model


def derived_seed(*parts: int) -> int:
    """A seed that depends only on its parts (position in training), so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def masked_batch(masker: MLMMasker, rows: torch.Tensor, mask_seed: int, device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """MLM-masked rows on `device`."""
    batch = masker(rows, seed=mask_seed)
    if bool(batch["attention_mask"].all()):
        del batch["attention_mask"]  # packed sequences: no mask lets SDPA pick its fastest kernel
    return {key: value.to(device) for key, value in batch.items()}
