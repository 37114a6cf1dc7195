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
from ds_pld.models import BertConfig, build_bert_config
from ds_pld.training.config import RunConfig


def load_data(config: RunConfig, output_dir: Path, rank: int) -> PretrainingData:
    """`data.path`, or a dataset rank 0 prepares from `data.corpus` into `<output_dir>/data`; the tokenizer is saved
    beside the run's outputs."""
    data = config.data
    path = Path(data.path) if data.path else output_dir / "data"
    if not data.path and rank == 0:
        prepare_dataset(path, corpus_files=list(data.corpus) or None, tokenizer=data.tokenizer,
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
    if rank == 0:
        loaded.tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    return loaded


def model_config(config: RunConfig, data: PretrainingData, meta: dict[str, Any] | None) -> BertConfig:
    """The checkpoint's model config when resuming (it may be EarlyBERT-pruned), else the config's, sized to the
    data's vocabulary, with slimming coefficients when EarlyBERT searches."""
    if meta is not None:
        return build_bert_config(meta["model_config"])
    spec = config.model or build_bert_config("bert-base")
    overrides: dict[str, Any] = {"vocab_size": data.vocab_size, "pad_token_id": data.tokenizer.pad_token_id}
    if config.earlybert is not None:
        overrides["slimming"] = True
    model = spec.with_updates(**overrides)
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
