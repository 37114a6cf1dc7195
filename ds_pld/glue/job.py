"""A GLUE job: validate everything first (config, tasks, tokenizer, model, data), then fine-tune every task with
every seed, writing `<output_dir>/<task>/seed<k>/metrics.json` per run and the summary (median over seeds by
default, see `glue.aggregate`) as `glue_summary.json` and `glue_summary.md`."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepspeed import comm as dist
from transformers import PreTrainedTokenizerBase

from ds_pld.config_errors import ConfigError
from ds_pld.glue.config import GlueConfig, parse_glue_config
from ds_pld.glue.data import GlueSplits, check_glue_tokenizer, load_glue_task, tokenize
from ds_pld.glue.finetune import RunResult, finetune_run
from ds_pld.glue.model import check_model_exists, check_vocabulary, load_encoder
from ds_pld.glue.summary import summarize, summary_markdown, write_summary
from ds_pld.glue.tasks import GlueTask, parse_tasks
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.io import find_tokenizer
from ds_pld.training.metrics import write_json

logger = logging.getLogger(__name__)

RUN_FILE = "metrics.json"


def resolve_tokenizer(model: str | Path, tokenizer: str | Path | None) -> PreTrainedTokenizerBase:
    """The given tokenizer, else the one saved beside the model (`<model>/tokenizer`, or a run's)."""
    from ds_pld.data.tokenizer import load_tokenizer

    path = tokenizer if tokenizer is not None else find_tokenizer(model)
    if path is None:
        raise ConfigError(f"no tokenizer folder beside '{model}'; pass --tokenizer")
    loaded = load_tokenizer(path)
    check_glue_tokenizer(loaded)
    return loaded


def prepare(model: str | Path, tasks: str | list[str], deepspeed_config: str | Path | Mapping[str, Any],
            glue_dir: str | Path | None = None, tokenizer: str | Path | None = None,
            seeds: tuple[int, ...] | None = None, epochs: float | None = None, max_steps: int | None = None
            ) -> tuple[GlueConfig, dict[str, Any], list[GlueTask], BertForPreTraining, PreTrainedTokenizerBase,
                       dict[str, GlueSplits]]:
    """Everything a job needs, validated before any training: config, tasks, tokenizer, model, data."""
    glue, base = parse_glue_config(deepspeed_config, glue_dir)
    glue = glue.with_overrides(epochs=epochs, seeds=seeds)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"--max_steps = {max_steps!r} must be a positive integer")
    task_list = parse_tasks(tasks, glue_dir)  # custom task folders in glue_dir resolve too
    check_model_exists(model)  # before the tokenizer, which is looked up beside the model
    tok = resolve_tokenizer(model, tokenizer)
    pretrained = load_encoder(model, slimming=glue.earlybert is not None)
    check_vocabulary(pretrained.config, tok, f"model '{model}'")
    positions = pretrained.config.max_position_embeddings
    for task in task_list:
        length = glue.settings(task.name).max_seq_length
        if length > positions:
            raise ConfigError(f"'glue.max_seq_length' = {length} for {task.display} exceeds the model's "
                              f"{positions} position embeddings")
    data = {task.name: load_glue_task(task, glue_dir) for task in task_list}
    return glue, base, task_list, pretrained, tok, data


def run_glue(model: str | Path, tasks: str | list[str], output_dir: str | Path,
             deepspeed_config: str | Path | Mapping[str, Any], glue_dir: str | Path | None = None,
             tokenizer: str | Path | None = None, seeds: tuple[int, ...] | None = None, epochs: float | None = None,
             max_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune on every task with every seed, write each run's metrics and the summary, and return the summary.
    Needs an initialized torch.distributed."""
    glue, base, task_list, pretrained, tok, data = prepare(model, tasks, deepspeed_config, glue_dir, tokenizer,
                                                           seeds, epochs, max_steps)
    rank = dist.get_rank()
    output_dir = Path(output_dir)
    results: list[RunResult] = []
    for task in task_list:
        settings = glue.settings(task.name)
        train = tokenize(data[task.name].train, tok, settings.max_seq_length)
        dev = {name: tokenize(split, tok, settings.max_seq_length) for name, split in data[task.name].dev.items()}
        for seed in glue.seeds:
            result = finetune_run(task, seed, pretrained, train, dev, tok, glue, base, max_steps)
            results.append(result)
            if rank == 0:
                run_dir = output_dir / task.name / f"seed{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json(run_dir / RUN_FILE, result.to_dict())
                logger.info("%s seed %d: %d steps, loss %.4f, dev %s", task.display, seed, result.steps,
                            result.train_loss, json.dumps(result.dev))
    summary = summarize(results, glue.aggregate, str(model))
    if rank == 0:
        json_path, md_path = write_summary(summary, output_dir)
        logger.info("summary: %s, %s\n%s", json_path, md_path, summary_markdown(summary))
    dist.barrier()
    return summary
