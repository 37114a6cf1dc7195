"""Corpus -> tokenized, packed, split dataset on disk, cached by a fingerprint of the inputs and settings.

Output layout (all under `output_dir`):
- `dataset/`   `DatasetDict.save_to_disk` with `train` and `validation`; one column `input_ids`, a fixed-size list of
               `max_seq_length` int16 (int32 for vocabularies over 32768) ids, every row `[CLS] ... [SEP]`;
- `tokenizer/` the tokenizer, loadable with `AutoTokenizer.from_pretrained`;
- `meta.json`  settings, counts and the fingerprint; written last, so its presence marks a complete result.

A run whose fingerprint (corpus content hashes, tokenizer, settings, pipeline format) matches `meta.json` returns at
once; `num_proc` is not part of it because the result does not depend on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from ds_pld.config_errors import ConfigError
from ds_pld.data.corpus import (
    DEFAULT_CORPUS,
    check_encoding_errors,
    default_corpus_sha256,
    generate_documents,
    scan_corpus_files,
)
from ds_pld.data.packing import check_seq_length, pack_token_stream, split_documents, token_dtype, write_arrow
from ds_pld.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_wordpiece

FORMAT_VERSION = 1
DATASET_DIR = "dataset"
TOKENIZER_DIR = "tokenizer"
META_FILE = "meta.json"
WORK_DIR = ".work"
SPLITS = ("train", "validation")
_BATCH = 1000
SHARD_SIZE = "128MB"
MIN_PACK_ROWS = 256  # a packing process below this many rows costs more to fork than it saves

logger = logging.getLogger(__name__)


class StageTimer:
    """Seconds per preparation stage, recorded in meta.json so the scaling benchmark can tell where time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now
        return self.seconds


def default_num_proc() -> int:
    """All cores this process may run on (the affinity mask, not the machine's count, under schedulers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_settings(validation_fraction: float, num_proc: int | None, seed: int, text_field: str) -> int:
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)) \
            or not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"'validation_fraction' = {validation_fraction!r} must be a number in (0, 1)")
    if num_proc is None:
        num_proc = default_num_proc()
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ConfigError(f"'num_proc' = {num_proc!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"'seed' = {seed!r} must be a non-negative integer")
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"'text_field' = {text_field!r} must be a non-empty string")
    return num_proc


def _load_hub_documents(hub_dataset: str, text_field: str) -> tuple[datasets.Dataset, dict[str, Any]]:
    """`name` or `name:config`, split `train`; needs a network (or a warm HF cache), so it is not tested here."""
    name, _, config = hub_dataset.partition(":")
    try:
        docs = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # hub and builder errors vary; all mean the dataset is not usable.
        raise ConfigError(f"'hub_dataset' = '{hub_dataset}' could not be loaded: {exc}") from exc
    if text_field not in docs.column_names:
        raise ConfigError(f"'hub_dataset' = '{hub_dataset}' has no column 'text_field' = '{text_field}'; "
                          f"columns: {docs.column_names}")
    docs = docs.select_columns([text_field])
    if text_field != "text":
        docs = docs.rename_column(text_field, "text")
    files = [{"filename": Path(f["filename"]).name, "bytes": Path(f["filename"]).stat().st_size}
             for f in docs.cache_files]
    return docs, {"hub": hub_dataset, "files": files, "rows": len(docs)}


def _fingerprint(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_cached(out: Path, fingerprint: str) -> bool:
    meta = _read_meta(out)
    return (meta is not None and meta.get("fingerprint") == fingerprint
            and (out / DATASET_DIR / "dataset_dict.json").is_file() and (out / TOKENIZER_DIR).is_dir())


def _tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, sep_id: int) -> dict[str, list]:
    """Document tokens without [CLS]/[SEP] plus one [SEP] as the document separator; blank documents dropped."""
    texts = [text for text in batch["text"] if text and text.strip()]
    if not texts:
        return {"input_ids": [], "length": []}
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)["input_ids"]
    ids = [tokens + [sep_id] for tokens in encoded]
    return {"input_ids": ids, "length": [len(tokens) for tokens in ids]}


def _texts(docs: datasets.Dataset) -> Iterator[str]:
    for batch in docs.iter(batch_size=_BATCH):
        yield from batch["text"]


def _token_chunks(split: datasets.Dataset) -> Iterator[np.ndarray]:
    for table in split.with_format("arrow").iter(batch_size=10 * _BATCH):
        yield table.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _window(chunks: Iterator[np.ndarray], skip: int, count: int) -> Iterator[np.ndarray]:
    """Tokens [skip, skip + count) of a stream of chunks."""
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        piece = chunk[skip:skip + count]
        skip = 0
        count -= len(piece)
        yield piece
        if not count:
            return


def _pack_rows(job: tuple[datasets.Dataset, np.ndarray, np.ndarray, int, int, int, int, int, np.dtype, str]
               ) -> tuple[int, int]:
    """Rows [first, last) of a split's packed stream into one Arrow file. The documents' token offsets are known
    from their lengths, so each range is packed on its own and the rows are those one sequential pass would give."""
    tokenized, indices, offsets, first, last, seq, cls_id, sep_id, dtype, file = job
    content = seq - 2
    begin, end = first * content, last * content
    lo = int(np.searchsorted(offsets, begin, side="right")) - 1
    hi = int(np.searchsorted(offsets, end, side="left"))
    chunks = _window(_token_chunks(tokenized.select(indices[lo:hi])), begin - int(offsets[lo]), end - begin)
    return write_arrow(pack_token_stream(chunks, seq, cls_id, sep_id, dtype), Path(file), seq, dtype)


def _split_and_pack(tokenized: datasets.Dataset, tok: PreTrainedTokenizerBase, max_seq_length: int,
                    validation_fraction: float, seed: int, work: Path, num_proc: int = 1
                    ) -> tuple[dict[str, datasets.Dataset], dict[str, dict[str, int]], np.dtype]:
    """Split the tokenized documents and pack each split into Arrow shards under `work`, `num_proc` row ranges at
    a time (the result does not depend on num_proc); splits, counts, id dtype."""
    lengths = np.asarray(tokenized.data.column("length").to_numpy(), dtype=np.int64)
    train_docs, validation_docs = split_documents(lengths, validation_fraction, max_seq_length, seed)
    dtype = token_dtype(len(tok))
    content = max_seq_length - 2
    splits, counts = {}, {}
    for name, indices in zip(SPLITS, (train_docs, validation_docs)):
        offsets = np.concatenate([[0], np.cumsum(lengths[indices])])
        rows = int(offsets[-1]) // content
        parts = max(1, min(num_proc, rows // MIN_PACK_ROWS))
        bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
        jobs = [(tokenized, indices, offsets, int(a), int(b), max_seq_length, tok.cls_token_id, tok.sep_token_id,
                 dtype, str(work / f"{name}-{k:05d}.arrow")) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        if parts > 1:
            with multiprocessing.get_context("fork").Pool(parts) as pool:
                written = pool.map(_pack_rows, jobs)
        else:
            written = [_pack_rows(job) for job in jobs]
        splits[name] = datasets.concatenate_datasets([datasets.Dataset.from_file(job[-1]) for job in jobs])
        corpus_tokens = int(offsets[-1])
        counts[name] = {"documents": len(indices), "sequences": rows, "tokens": sum(t for _, t in written),
                        "corpus_tokens": corpus_tokens, "dropped_tokens": corpus_tokens - rows * content}
        assert sum(r for r, _ in written) == rows, "packed row ranges must cover the split exactly"
    return splits, counts, dtype


def prepare_dataset(output_dir: str | Path, corpus_files: Sequence[str | Path] | None = None,
                    tokenizer: str | Path | None = None, max_seq_length: int = 128,
                    validation_fraction: float = 0.05, vocab_size: int = 8192, num_proc: int | None = None,
                    text_field: str = "text", hub_dataset: str | None = None, seed: int = 0,
                    max_position_embeddings: int | None = None, encoding_errors: str = "strict") -> Path:
    """Build (or reuse) `<output_dir>/{dataset,tokenizer,meta.json}`; returns `output_dir` as a Path.

    All inputs are checked before any tokenizing: bad settings, a missing tokenizer folder and every corpus file
    (existence, UTF-8, JSON-lines text field, non-empty) raise ConfigError naming the key, file, line or byte.
    `corpus_files` may hold glob patterns and `.gz`/`.dz` files; `encoding_errors="replace"` accepts stray bytes
    (counted in meta.json's `corpus.replaced_bytes`) instead of refusing the file."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'output_dir' = '{out}' is a file")
    check_seq_length(max_seq_length, max_position_embeddings)
    num_proc = _check_settings(validation_fraction, num_proc, seed, text_field)
    check_encoding_errors(encoding_errors)
    if tokenizer is None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 10):
        raise ConfigError(f"'vocab_size' = {vocab_size!r} must be an integer >= 10")
    if hub_dataset is not None and corpus_files is not None:
        raise ConfigError("give either 'corpus_files' or 'hub_dataset', not both")
    given_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None

    hub_docs, paths, kinds = None, [], []
    if hub_dataset is not None:
        hub_docs, corpus = _load_hub_documents(hub_dataset, text_field)
    elif corpus_files is not None:
        scanned = scan_corpus_files(corpus_files, text_field, encoding_errors)
        paths, kinds = [f.path for f in scanned], [f.kind for f in scanned]
        corpus = {"files": [{"sha256": f.sha256, "kind": f.kind} for f in scanned]}
        if "jsonl" in kinds:
            corpus["text_field"] = text_field
        if encoding_errors != "strict":
            corpus["encoding_errors"] = encoding_errors
    else:
        corpus = {"default": DEFAULT_CORPUS, "sha256": default_corpus_sha256()}
    settings = {"max_seq_length": max_seq_length, "validation_fraction": validation_fraction, "seed": seed,
                "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else {"trained": vocab_size}}
    fingerprint = _fingerprint({"format": FORMAT_VERSION, "corpus": corpus, **settings})
    if _is_cached(out, fingerprint):
        logger.info("reusing the prepared dataset in %s (fingerprint %s)", out, fingerprint[:12])
        return out

    started = time.perf_counter()
    stages = StageTimer()
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if hub_docs is None:
            docs = datasets.Dataset.from_generator(
                generate_documents, features=datasets.Features({"text": datasets.Value("string")}),
                gen_kwargs={"paths": paths, "kinds": kinds, "text_field": text_field,
                            "encoding_errors": encoding_errors},
                cache_dir=str(work / "documents"), fingerprint=fingerprint)
        else:
            docs = hub_docs
        stages.lap("documents")
        tok = given_tokenizer or train_wordpiece(_texts(docs), vocab_size, length=len(docs),
                                                 model_max_length=max(512, max_seq_length))
        procs = min(num_proc, max(1, len(docs) // _BATCH + 1))
        stages.lap("tokenizer")
        tokenized = docs.map(
            _tokenize_batch, batched=True, batch_size=_BATCH, num_proc=procs if procs > 1 else None,
            remove_columns=docs.column_names, fn_kwargs={"tokenizer": tok, "sep_id": tok.sep_token_id},
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                        "length": datasets.Value("int64")}),
            cache_file_name=str(work / "tokenized.arrow"), desc="Tokenizing")
        stages.lap("tokenize")
        splits, counts, dtype = _split_and_pack(tokenized, tok, max_seq_length, validation_fraction, seed, work,
                                                procs)
        stages.lap("split_and_pack")
        for final in (DATASET_DIR, TOKENIZER_DIR):
            shutil.rmtree(out / final, ignore_errors=True)
        # Shards of bounded size, written by num_proc processes: loading maps them, so memory does not grow with them.
        datasets.DatasetDict(splits).save_to_disk(str(out / DATASET_DIR), max_shard_size=SHARD_SIZE,
                                                  num_proc=procs if procs > 1 else None)
        tok.save_pretrained(str(out / TOKENIZER_DIR))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 3),
        "stage_seconds": stages.lap("save"),
        "settings": {"max_seq_length": max_seq_length, "validation_fraction": validation_fraction, "seed": seed,
                     "vocab_size": vocab_size, "text_field": text_field, "num_proc": num_proc,
                     "encoding_errors": encoding_errors,
                     "tokenizer": str(tokenizer) if tokenizer is not None else None,
                     "corpus_files": paths or None, "hub_dataset": hub_dataset,
                     "default_corpus": DEFAULT_CORPUS if hub_dataset is None and corpus_files is None else None},
        "corpus": {**corpus, **({} if not paths else {
            "bytes": sum(f.num_bytes for f in scanned), "replaced_bytes": sum(f.replaced_bytes for f in scanned),
            "replaced_bytes_by_file": {f.path: f.replaced_bytes for f in scanned if f.replaced_bytes}})},
        "vocab_size": len(tok),
        "dtype": dtype.name,
        "special_token_ids": {"pad": tok.pad_token_id, "unk": tok.unk_token_id, "cls": tok.cls_token_id,
                              "sep": tok.sep_token_id, "mask": tok.mask_token_id},
        "counts": counts,
    }
    temporary = out / (META_FILE + ".tmp")
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temporary, out / META_FILE)
    logger.info("prepared %s: %s", out, {name: c["sequences"] for name, c in counts.items()})
    return out
