"""GLUE metrics (scikit-learn / scipy) and the GLUE average.

Metrics are fractions in [-1, 1]; the summary shows them x100 like the papers. A correlation with constant
predictions (a collapsed regressor) is undefined; it is scored 0, not NaN, so one bad seed cannot turn the median and
the GLUE average into NaN. A task's score is the mean of its
metrics (MRPC / QQP: F1 and accuracy; STS-B: Pearson and Spearman), the GLUE average the mean of the entry scores
(MNLI-m and MNLI-mm are separate entries; WNLI is left out, see `tasks.EXCLUDED_FROM_AVERAGE`)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ds_pld.glue.tasks import EXCLUDED_FROM_AVERAGE, GlueTask


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    """A correlation; 0 when one side is constant (scipy warns and returns NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        value = float(fn(predictions, labels)[0])
    return 0.0 if math.isnan(value) else value


def compute_metrics(task: GlueTask, predictions: Iterable, labels: Iterable) -> dict[str, float]:
    """The task's GLUE metrics. `predictions`: class ids (classification) or scores (regression)."""
    preds, gold = np.asarray(list(predictions)), np.asarray(list(labels))
    if preds.shape != gold.shape:
        raise ValueError(f"{task.name}: {preds.shape[0]} predictions for {gold.shape[0]} labels")
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(gold, preds))
        elif metric == "f1":
            out[metric] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
        elif metric == "matthews_correlation":
            out[metric] = float(matthews_corrcoef(gold, preds))
        elif metric == "pearson":
            out[metric] = _correlation(pearsonr, preds.astype(float), gold.astype(float))
        elif metric == "spearman":
            out[metric] = _correlation(spearmanr, preds.astype(float), gold.astype(float))
        else:
            raise ValueError(f"{task.name}: unknown metric {metric!r}")
    return out


def task_score(metrics: Mapping[str, float]) -> float:
    """One number per entry: the mean of its metrics, x100."""
    return 100.0 * float(np.mean(list(metrics.values())))


def glue_average(scores: Mapping[str, float]) -> float:
    """Mean entry score over the evaluated entries, WNLI excluded; NaN when nothing is left to average."""
    kept = [score for entry, score in scores.items() if entry.split("-")[0] not in EXCLUDED_FROM_AVERAGE]
    return float(np.mean(kept)) if kept else math.nan


def aggregate(values: Iterable[float], how: str) -> float:
    """Median or mean over seeds."""
    array = np.asarray(list(values), dtype=float)
    return float(np.median(array) if how == "median" else np.mean(array))
