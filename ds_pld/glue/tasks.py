"""The GLUE tasks: where their data lives (original TSV layout and the Hugging Face `glue` dataset), which columns
hold the text and the label, and how they are scored.

Label ids follow the Hugging Face `glue` dataset, so a model fine-tuned from TSV files and one fine-tuned from the hub
agree on what label 0 means."""
from __future__ import annotations

from dataclasses import dataclass

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


def get_task(name: str) -> GlueTask:
    """The task named `name` (case-insensitive; GLUE folder names such as `SST-2` work too)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[GlueTask]:
    """`rte,mrpc,...` (or `all`) as a list of tasks without duplicates, in the given order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (name.strip() for name in names) if n]
    if names == ["all"]:
        return list(GLUE_TASKS.values())
    if not names:
        raise ConfigError("no GLUE task given; pass e.g. --tasks rte,mrpc")
    tasks: list[GlueTask] = []
    for name in names:
        task = get_task(name)
        if task not in tasks:
            tasks.append(task)
    return tasks
