"""GLUE data: the original TSV layout (`<glue_dir>/SST-2/train.tsv`, `dev.tsv`; MNLI `dev_matched.tsv` /
`dev_mismatched.tsv`; CoLA without a header) or the Hugging Face `glue` dataset (online only), normalized to
`datasets.Dataset`s with the columns `text_a`, (`text_b`,) `label`; then tokenized for the encoder. A custom task
(`<glue_dir>/<name>/task.json`, see `ds_pld.glue.tasks`) reads `<glue_dir>/<name>/train.tsv` and `dev.tsv` (with a
header row) the same way; it has no hub copy.

The TSVs are read with quoting off: GLUE sentences contain unbalanced quote characters."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from ds_pld.config_errors import ConfigError
from ds_pld.glue.tasks import GlueTask

HUB_DATASET = "nyu-mll/glue"
TEXT_COLUMNS = ("text_a", "text_b")


@dataclass(frozen=True)
class GlueSplits:
    """Training data and the evaluation entries (`dev`, or MNLI's `m` / `mm`), untokenized."""

    train: Dataset
    dev: dict[str, Dataset]


def read_glue_tsv(task: GlueTask, path: str | Path) -> Dataset:
    """One GLUE TSV file as `text_a`, (`text_b`,) `label` (int ids, or float scores for STS-B).

    Rows with missing fields (a few in QQP's train file) are dropped, as GLUE's reference loaders do."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GLUE task {task.display}: file '{path}' does not exist")
    try:
        frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                            header=None if task.header else 0, names=list(task.header) if task.header else None,
                            on_bad_lines="skip", encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"GLUE task {task.display}: '{path}' is not a readable TSV file: {err}") from err
    needed = [*task.text_columns, task.label_column]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise ConfigError(f"GLUE task {task.display}: '{path}' has no column(s) {missing} "
                          f"(columns: {list(frame.columns)})")
    frame = frame[needed].dropna()
    frame = frame[frame[task.label_column].str.strip() != ""]
    if frame.empty:
        raise ConfigError(f"GLUE task {task.display}: '{path}' holds no labelled rows")
    labels = frame[task.label_column].str.strip()
    if task.is_regression:
        try:
            label_values: list[Any] = [float(v) for v in labels]
        except ValueError as err:
            raise ConfigError(f"GLUE task {task.display}: '{path}' column '{task.label_column}' must hold "
                              f"numbers: {err}") from None
    else:
        ids = {label: i for i, label in enumerate(task.labels)}
        unknown = sorted(set(labels) - set(ids))
        if unknown:
            raise ConfigError(f"GLUE task {task.display}: '{path}' column '{task.label_column}' holds unknown "
                              f"label(s) {unknown[:5]}; expected {list(task.labels)}")
        label_values = [ids[label] for label in labels]
    data = {name: frame[column].tolist() for name, column in zip(TEXT_COLUMNS, task.text_columns)}
    data["label"] = label_values
    return Dataset.from_dict(data)


def load_glue_tsv(task: GlueTask, glue_dir: str | Path) -> GlueSplits:
    """`<glue_dir>/<TaskFolder>/train.tsv` and the task's dev files."""
    glue_dir = Path(glue_dir)
    if not glue_dir.is_dir():
        raise ConfigError(f"GLUE data folder '{glue_dir}' does not exist")
    folder = glue_dir / task.folder
    if not folder.is_dir():
        raise ConfigError(f"GLUE task {task.display}: folder '{folder}' does not exist (expected the GLUE layout "
                          f"<glue_dir>/{task.folder}/train.tsv)")
    return GlueSplits(train=read_glue_tsv(task, folder / "train.tsv"),
                      dev={dev: read_glue_tsv(task, folder / f"{stem}.tsv") for dev, stem in task.dev_files})


def load_glue_hub(task: GlueTask) -> GlueSplits:
    """The Hugging Face `glue` dataset (needs the network or a filled datasets cache)."""
    from datasets import load_dataset

    if task.is_custom:
        raise ConfigError(f"custom task {task.name!r} has no Hugging Face dataset; pass --glue_dir with its folder "
                          f"<glue_dir>/{task.folder}/")

    def normalize(split: str) -> Dataset:
        data = load_dataset(HUB_DATASET, task.name, split=split)
        data = data.rename_columns(dict(zip(task.hub_columns, TEXT_COLUMNS)))
        return data.select_columns([*TEXT_COLUMNS[:len(task.hub_columns)], "label"])

    return GlueSplits(train=normalize("train"), dev={dev: normalize(split) for dev, split in task.hub_dev_splits})


def load_glue_task(task: GlueTask, glue_dir: str | Path | None) -> GlueSplits:
    """From the TSV folder when one is given, else from the hub."""
    return load_glue_tsv(task, glue_dir) if glue_dir is not None else load_glue_hub(task)


def check_glue_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """The classifier reads position 0, so the tokenizer must put [CLS] there; padding needs a pad token."""
    if tokenizer.pad_token_id is None or tokenizer.cls_token_id is None:
        raise ConfigError("the tokenizer has no pad or cls token; a BERT-style tokenizer is required")
    ids = tokenizer("a", "b")["input_ids"]
    if ids[0] != tokenizer.cls_token_id:
        raise ConfigError("the tokenizer does not start inputs with its [CLS] token (no BERT post-processor); "
                          "the classifier reads the hidden state at position 0")


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Dataset:
    """input_ids / token_type_ids / attention_mask / label, truncated to `max_seq_length` (pairs: longest first);
    padding happens per batch in the collator."""
    pair = "text_b" in dataset.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text_a"], batch["text_b"] if pair else None, truncation=True,
                         max_length=max_seq_length, return_token_type_ids=True)

    return dataset.map(encode, batched=True, remove_columns=[c for c in TEXT_COLUMNS if c in dataset.column_names])


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Right padding to the longest sequence in the batch; `label` becomes `labels`."""
    if tokenizer.padding_side != "right":
        raise ConfigError(f"the tokenizer pads on the {tokenizer.padding_side}; the encoder's positions start at "
                          f"the first token, so padding must be on the right")
    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
