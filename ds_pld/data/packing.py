"""Packing: documents' tokens concatenated ([SEP] after each document) and cut into `[CLS] ... [SEP]` sequences of
exactly `max_seq_length`, so no compute goes to padding. The tail of each split (fewer than `max_seq_length - 2`
tokens) is dropped, not padded. The validation split is drawn by whole documents, so no text is in both splits."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ds_pld.config_errors import ConfigError

MIN_SEQ_LENGTH = 8


def check_seq_length(max_seq_length: int, max_position_embeddings: int | None = None,
                     key: str = "max_seq_length") -> int:
    """A packed sequence must hold [CLS], [SEP] and some text, and fit the model's position table."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int):
        raise ConfigError(f"'{key}' must be an integer, got {max_seq_length!r}")
    if max_seq_length < MIN_SEQ_LENGTH:
        raise ConfigError(f"'{key}' = {max_seq_length} must be >= {MIN_SEQ_LENGTH}")
    if max_position_embeddings is not None and max_seq_length > max_position_embeddings:
        raise ConfigError(f"'{key}' = {max_seq_length} exceeds 'model.max_position_embeddings' = "
                          f"{max_position_embeddings}")
    return max_seq_length


def token_dtype(vocab_size: int) -> np.dtype:
    """int16 halves the dataset on disk and in the page cache for vocabularies up to 32767 ids (BERT's is 30522)."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def split_documents(lengths: np.ndarray, validation_fraction: float, max_seq_length: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices, each sorted. Validation takes documents in a seeded random order until
    it holds `validation_fraction` of the tokens and at least one full sequence; train must keep one too."""
    content = max_seq_length - 2
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(lengths))
    target = max(math.ceil(validation_fraction * total), content)
    taken = int(np.searchsorted(np.cumsum(lengths[order]), target)) + 1
    validation, train = np.sort(order[:taken]), np.sort(order[taken:])
    if len(validation) >= len(lengths) or int(lengths[train].sum()) < content:
        raise ConfigError(f"the corpus is too small for 'max_seq_length' = {max_seq_length} with "
                          f"'validation_fraction' = {validation_fraction}: {total} tokens in {len(lengths)} "
                          f"documents; train and validation each need at least {content} tokens of whole documents")
    return train, validation


def pack_token_stream(chunks: Iterable[np.ndarray], max_seq_length: int, cls_id: int, sep_id: int,
                      dtype: np.dtype | type = np.int32) -> Iterator[np.ndarray]:
    """[n, max_seq_length] blocks from a stream of token arrays (documents with their [SEP] already appended).

    A remainder is carried into the next chunk, so the result does not depend on how the stream is chunked (nor on
    num_proc); only the final remainder is dropped."""
    content, dtype = max_seq_length - 2, np.dtype(dtype)
    carry = np.zeros(0, dtype=dtype)
    for chunk in chunks:
        stream = np.concatenate([carry, np.asarray(chunk, dtype=dtype)])
        count = len(stream) // content
        carry = stream[count * content:]
        if count:
            block = np.empty((count, max_seq_length), dtype=dtype)
            block[:, 0] = cls_id
            block[:, 1:-1] = stream[:count * content].reshape(count, content)
            block[:, -1] = sep_id
            yield block


def write_arrow(blocks: Iterable[np.ndarray], path: Path, max_seq_length: int, dtype: np.dtype) -> tuple[int, int]:
    """Stream packed blocks into an Arrow IPC file (the format `datasets.Dataset.from_file` maps) with one
    fixed-size-list column `input_ids`; returns (sequences, tokens)."""
    arrow_type = pa.from_numpy_dtype(dtype)
    schema = pa.schema([pa.field("input_ids", pa.list_(arrow_type, max_seq_length))])
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for block in blocks:
            column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), type=arrow_type), max_seq_length)
            writer.write_batch(pa.record_batch([column], schema=schema))
            rows += len(block)
    return rows, rows * max_seq_length
