"""Reading a prepared dataset back: the training job's single entry point to the data on disk."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ds_pld.config_errors import ConfigError
from ds_pld.data.prepare import DATASET_DIR, FORMAT_VERSION, META_FILE, TOKENIZER_DIR


@dataclass(frozen=True)
class PretrainingData:
    """Packed splits (torch format: `ds[i]['input_ids']` is a LongTensor [max_seq_length]) and their tokenizer.
    `vocab_size` is the tokenizer's length: the model's embedding table needs at least that many rows."""

    train: datasets.Dataset
    validation: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    max_seq_length: int
    vocab_size: int
    path: Path
    meta: dict[str, Any] = field(repr=False)


def load_pretraining_data(path: str | Path) -> PretrainingData:
    """Load `<path>/{dataset,tokenizer,meta.json}` written by prepare_dataset; ConfigError naming the path if
    it is not a complete prepared dataset or was written by an incompatible pipeline version."""
    root = Path(path).expanduser().resolve()
    meta_file = root / META_FILE
    if not meta_file.is_file():
        raise ConfigError(f"'{root}' is not a prepared dataset: '{meta_file}' is missing (run launch/prepare_data.py)")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"'{meta_file}' is not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"'{meta_file}' has format_version {meta.get('format_version')!r}, this code reads "
                          f"{FORMAT_VERSION}; prepare the dataset again")
    splits = datasets.load_from_disk(str(root / DATASET_DIR))
    tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
    max_seq_length = int(meta["settings"]["max_seq_length"])
    return PretrainingData(train=splits["train"].with_format("torch"),
                           validation=splits["validation"].with_format("torch"),
                           tokenizer=tokenizer, max_seq_length=max_seq_length, vocab_size=len(tokenizer),
                           path=root, meta=meta)
