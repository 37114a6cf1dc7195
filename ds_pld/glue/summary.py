"""A GLUE job's summary: per entry the metrics of every seed and their aggregate, the entry scores and the GLUE
average, as JSON (`glue_summary.json`) and a markdown table (`glue_summary.md`).

Custom tasks (`task.json` folders) get rows like the GLUE tasks but stay out of the GLUE average, so the average
remains comparable with the papers'."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_pld.config_errors import ConfigError
from ds_pld.glue.metrics import aggregate, glue_average, task_score
from ds_pld.glue.tasks import EXCLUDED_FROM_AVERAGE, GLUE_TASKS, TABLE_ORDER, get_task
from ds_pld.training.metrics import write_json

if TYPE_CHECKING:
    from ds_pld.glue.finetune import RunResult

SUMMARY_JSON = "glue_summary.json"
SUMMARY_MD = "glue_summary.md"
METRIC_ABBREVIATIONS = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson",
                        "spearman": "Spearman"}


def _entry_order(entry: str) -> tuple[int, str]:
    return (TABLE_ORDER.index(entry) if entry in TABLE_ORDER else len(TABLE_ORDER), entry)


def _display(entry: str) -> str:
    """`RTE`, `MNLI-m`; a custom task's entry is shown as it is named."""
    task, _, dev = entry.partition("-")
    try:
        name = get_task(task).display
    except ConfigError:
        return entry
    return f"{name}-{dev}" if dev else name


def _in_glue_average(entry: str) -> bool:
    """A GLUE task's entry that the average counts: not WNLI, not a custom task."""
    task = entry.split("-")[0]
    return task in GLUE_TASKS and task not in EXCLUDED_FROM_AVERAGE


def summarize(results: list[RunResult], how: str, model: str | None = None) -> dict[str, Any]:
    """Per entry: the metrics of every seed, their aggregate (`how`: median or mean, per metric), and the entry
    score = aggregate over seeds of the per-seed score (mean of the entry's metrics, x100); then the GLUE average
    of the GLUE entries' scores (custom tasks left out)."""
    entries: dict[str, dict[str, Any]] = {}
    for result in results:
        for entry, metrics in result.dev.items():
            item = entries.setdefault(entry, {"task": result.task, "metrics": list(metrics), "per_seed": {},
                                              "per_seed_score": {}, "learning_rate": result.learning_rate})
            item["per_seed"][str(result.seed)] = metrics
            item["per_seed_score"][str(result.seed)] = task_score(metrics)
    ordered: dict[str, dict[str, Any]] = {}
    for entry in sorted(entries, key=_entry_order):
        item = entries[entry]
        item["aggregated"] = {m: aggregate([seed[m] for seed in item["per_seed"].values()], how)
                              for m in item["metrics"]}
        item["score"] = aggregate(item["per_seed_score"].values(), how)
        ordered[entry] = item
    scores = {entry: item["score"] for entry, item in ordered.items() if _in_glue_average(entry)}
    return {"model": None if model is None else str(model), "aggregate": how,
            "seeds": sorted({result.seed for result in results}), "entries": ordered,
            "glue_average": glue_average(scores),
            "average_over": [e for e in ordered if _in_glue_average(e)],
            "runs": [result.to_dict() for result in results]}


def _cell(metrics: Mapping[str, float], names: list[str]) -> str:
    return "/".join(f"{100 * metrics[m]:.1f}" for m in names)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The table: one row per entry, a column per seed, the aggregate, the entry score, then the GLUE average."""
    seeds = [str(s) for s in summary["seeds"]]
    how = summary["aggregate"]
    lines = [(f"GLUE dev results ({how} over seeds {', '.join(seeds)}; metrics x100; score = {how} over seeds of the "
             f"mean of the task's metrics)"), "",
             "| Task | Metric | " + " | ".join(f"seed {s}" for s in seeds) + f" | {how} | score |",
             "|---|---|" + "---:|" * (len(seeds) + 2)]
    for entry, item in summary["entries"].items():
        names = item["metrics"]
        cells = [_cell(item["per_seed"][s], names) if s in item["per_seed"] else "-" for s in seeds]
        lines.append(f"| {_display(entry)} | {'/'.join(METRIC_ABBREVIATIONS[m] for m in names)} | "
                     + " | ".join(cells) + f" | {_cell(item['aggregated'], names)} | {item['score']:.1f} |")
    average = summary["glue_average"]
    over = ", ".join(_display(e) for e in summary["average_over"]) or "nothing"
    lines.append(f"| **GLUE average** | over {over} | " + " | ".join("" for _ in seeds)
                 + f" | | {'-' if average is None or math.isnan(average) else f'{average:.1f}'} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Mapping[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    md_path = output_dir / SUMMARY_MD
    md_path.write_text(summary_markdown(summary))
    return write_json(output_dir / SUMMARY_JSON, summary), md_path
