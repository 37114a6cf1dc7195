"""The GLUE tasks: where their data lives (original TSV layout and the Hugging Face `glue` dataset), which columns
hold the text and the label, and how they are scored.

Label ids follow the Hugging Face `glue` dataset, so a model fine-tuned from TSV files and one fine-tuned from the hub
agree on what label 0 means.

Custom tasks: a folder `<glue_dir>/<name>/` holding `task.json`, `train.tsv` and `dev.tsv` (header row) is a task
too, resolved by name when `glue_dir` is given (GLUE names always win). `task.json`:

  {"name": "wordpos", "text_columns": ["sentence"], "label_column": "label", "labels": ["n", "v", "adj", "adv"],
   "metrics": ["accuracy"], "description": "optional free text"}

`labels` lists the label strings in id order (null: regression); `metrics` are GLUE metrics that fit the task
(`CLASSIFICATION_METRICS`, f1 only with two labels, label id 1 positive; or `REGRESSION_METRICS`). The name is
lowercase letters, digits and underscores and must be the folder's name. A custom task is not part of the GLUE
average."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    `text_columns` / `label_column` name the TSV columns (CoLA has no header: `header` gives its column names);
    `labels` lists the TSV label strings in id order (None: regression); `dev_files` maps each evaluation entry
    (MNLI has two) to its TSV file stem and `hub_dev_splits` to the hub split; `metrics` are the GLUE metrics,
    whose mean is the task's score."""

    name: str
    folder: str
    display: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    hub_columns: tuple[str, ...]
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev"),)
    hub_dev_splits: tuple[tuple[str, str], ...] = (("dev", "validation"),)
    header: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def entry_name(self, dev: str) -> str:
        """The summary-table name of one evaluation entry: the task, or `mnli-m` / `mnli-mm`."""
        return self.name if dev == "dev" else f"{self.name}-{dev}"

    def entries(self) -> list[str]:
        return [self.entry_name(dev) for dev, _ in self.dev_files]

    @property
    def is_custom(self) -> bool:
        """A task defined by a `task.json` folder, not one of the GLUE tasks."""
        return self.name not in GLUE_TASKS


_BINARY = ("0", "1")
_ACC = ("accuracy",)

GLUE_TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", "CoLA", "CoLA", ("sentence",), "label", _BINARY, ("matthews_correlation",), ("sentence",),
             header=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", "SST-2", "SST-2", ("sentence",), "label", _BINARY, _ACC, ("sentence",)),
    GlueTask("mrpc", "MRPC", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, ("f1", "accuracy"),
             ("sentence1", "sentence2")),
    GlueTask("stsb", "STS-B", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"),
             ("sentence1", "sentence2")),
    GlueTask("qqp", "QQP", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, ("f1", "accuracy"),
             ("question1", "question2")),
    GlueTask("mnli", "MNLI", "MNLI", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), _ACC, ("premise", "hypothesis"),
             dev_files=(("m", "dev_matched"), ("mm", "dev_mismatched")),
             hub_dev_splits=(("m", "validation_matched"), ("mm", "validation_mismatched"))),
    GlueTask("qnli", "QNLI", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), _ACC,
             ("question", "sentence")),
    GlueTask("rte", "RTE", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), _ACC,
             ("sentence1", "sentence2")),
    GlueTask("wnli", "WNLI", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, _ACC, ("sentence1", "sentence2")),
)}

# Spellings people use for the same task: the GLUE folder names and the hyphenated forms.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}

# The order of the summary table: the PLD paper's.
TABLE_ORDER = ("rte", "mrpc", "stsb", "cola", "sst2", "qnli", "qqp", "mnli-m", "mnli-mm", "wnli")

# WNLI's dev set is adversarial (models score below the majority baseline); BERT and the PLD paper leave it out of
# the average, and so does the summary.
EXCLUDED_FROM_AVERAGE = ("wnli",)


TASK_FILE = "task.json"
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearman")
_REQUIRED_KEYS = ("name", "text_columns", "label_column", "labels", "metrics")
_OPTIONAL_KEYS = ("description",)
_CUSTOM_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


def task_key(name: str) -> str:
    """The name a task is filed under: a GLUE task's canonical name (`SST-2` -> `sst2`), else the name lower-cased
    (a custom task's name)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def _task_file_error(path: Path, message: str) -> ConfigError:
    return ConfigError(f"custom task file '{path}': {message}")


def _string_list(path: Path, key: str, value: Any, lengths: tuple[int, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _task_file_error(path, f"'{key}' = {value!r} must be a list of non-empty strings")
    if len(set(value)) != len(value):
        raise _task_file_error(path, f"'{key}' = {value!r} holds duplicates")
    if lengths is not None and len(value) not in lengths:
        raise _task_file_error(path, f"'{key}' = {value!r} must hold {' or '.join(map(str, lengths))} item(s)")
    return tuple(value)


def load_custom_task(path: str | Path) -> GlueTask:
    """A custom task's `task.json` (the file, or its folder) validated into a GlueTask; errors are one line naming
    the file and the key."""
    path = Path(path)
    if path.is_dir():
        path = path / TASK_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _task_file_error(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _task_file_error(path, f"cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise _task_file_error(path, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise _task_file_error(path, f"must hold a JSON object, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise _task_file_error(path, f"missing key(s) {missing} (required: {list(_REQUIRED_KEYS)})")
    unknown = sorted(set(raw) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise _task_file_error(path, f"unknown key(s) {unknown}; allowed: {[*_REQUIRED_KEYS, *_OPTIONAL_KEYS]}")
    name = raw["name"]
    if not isinstance(name, str) or not _CUSTOM_NAME.fullmatch(name):
        raise _task_file_error(path, f"'name' = {name!r} must be lowercase letters, digits and underscores")
    if name in GLUE_TASKS or name in _ALIASES:
        raise _task_file_error(path, f"'name' = {name!r} is a GLUE task's name; pick another")
    if name != path.parent.name:
        raise _task_file_error(path, f"'name' = {name!r} must be the name of its folder '{path.parent.name}'")
    text_columns = _string_list(path, "text_columns", raw["text_columns"], lengths=(1, 2))
    label_column = raw["label_column"]
    if not isinstance(label_column, str) or not label_column.strip():
        raise _task_file_error(path, f"'label_column' = {label_column!r} must be a non-empty string")
    if label_column in text_columns:
        raise _task_file_error(path, f"'label_column' = {label_column!r} is also a text column")
    labels = raw["labels"]
    if labels is not None:
        labels = _string_list(path, "labels", labels)
        if len(labels) < 2:
            raise _task_file_error(path, f"'labels' = {list(labels)} must hold at least 2 labels (null: regression)")
    metrics = _string_list(path, "metrics", raw["metrics"])
    if not metrics:
        raise _task_file_error(path, "'metrics' must name at least one metric")
    fitting = REGRESSION_METRICS if labels is None else CLASSIFICATION_METRICS
    wrong = [m for m in metrics if m not in fitting]
    if wrong:
        kind = "a regression ('labels' null)" if labels is None else "a classification"
        raise _task_file_error(path, f"'metrics' = {list(metrics)}: {wrong} unknown or not for {kind} task; "
                                     f"choose from {list(fitting)}")
    if "f1" in metrics and len(labels) != 2:
        raise _task_file_error(path, f"'metrics' = {list(metrics)}: f1 needs exactly 2 labels, 'labels' has "
                                     f"{len(labels)}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise _task_file_error(path, f"'description' = {description!r} must be a string")
    return GlueTask(name, name, name, text_columns, label_column, labels, metrics, hub_columns=(),
                    hub_dev_splits=())


def get_task(name: str, glue_dir: str | Path | None = None) -> GlueTask:
    """The task named `name` (case-insensitive; GLUE folder names such as `SST-2` work too); a name that is not a
    GLUE task's is a custom task when `<glue_dir>/<name>/task.json` exists."""
    key = task_key(name)
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    if glue_dir is None:
        where = "which needs --glue_dir"
    elif not _CUSTOM_NAME.fullmatch(key):
        where = "whose name is lowercase letters, digits and underscores"
    elif (Path(glue_dir) / key / TASK_FILE).is_file():
        return load_custom_task(Path(glue_dir) / key / TASK_FILE)
    else:
        where = f"'{Path(glue_dir) / key / TASK_FILE}' does not exist"
    raise ConfigError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}, or a custom task folder "
                      f"<glue_dir>/<name>/{TASK_FILE} ({where})")


def parse_tasks(spec: str | list[str] | tuple[str, ...], glue_dir: str | Path | None = None) -> list[GlueTask]:
    """`rte,mrpc,...` (or `all`) as a list of tasks without duplicates, in the given order; with `glue_dir`, custom
    task folders resolve by name too."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (name.strip() for name in names) if n]
    if names == ["all"]:
        return list(GLUE_TASKS.values())
    if not names:
        raise ConfigError("no GLUE task given; pass e.g. --tasks rte,mrpc")
    tasks: list[GlueTask] = []
    for name in names:
        task = get_task(name, glue_dir)
        if task not in tasks:
            tasks.append(task)
    return tasks
