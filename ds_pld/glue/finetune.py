"""GLUE fine-tuning through `ds_pld.initialize`: every (task, seed) run trains a fresh classifier on the pretrained
encoder, evaluates on the dev entries, and the summary aggregates the seeds (median by default, see
`glue.aggregate`) into a markdown table and a JSON file with the GLUE average.

Schedule: AdamW (weight decay off for biases, LayerNorms and slimming coefficients), linear warmup over
`warmup_ratio` of the steps, then linear decay to 0 (transformers' `get_linear_schedule_with_warmup` formula).

EarlyBERT fine-tuning mode (a `glue.earlybert` block, Chen et al. 2021): the encoder gets slimming coefficients, the
L1 penalty is added to the loss while searching, the detector observes the masks after every optimizer step, and
when it draws, the encoder is pruned physically (the classifier head is kept), the DeepSpeed engine is rebuilt for
the new shapes (the learning-rate schedule continues where it was; Adam's moments start afresh) and training goes on
until the run's step budget is spent. With `rewind`, the pruned model starts from the weights before the search.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from datasets import Dataset
from deepspeed import comm as dist
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase, set_seed

import ds_pld
from ds_pld.config_errors import ConfigError
from ds_pld.earlybert import EarlyBird, Ticket, prune_model
from ds_pld.earlybert.coefficients import coefficient_values
from ds_pld.engine import DsPldEngine
from ds_pld.glue.config import GlueConfig, TaskSettings, parse_glue_config
from ds_pld.glue.data import GlueSplits, check_glue_tokenizer, collator, load_glue_task, tokenize
from ds_pld.glue.metrics import aggregate, compute_metrics, glue_average, task_score
from ds_pld.glue.model import SequenceClassifier, check_model_exists, check_vocabulary, load_encoder
from ds_pld.glue.tasks import EXCLUDED_FROM_AVERAGE, TABLE_ORDER, GlueTask, get_task, parse_tasks
from ds_pld.models.bert import BertForPreTraining
from ds_pld.models.config import BertConfig
from ds_pld.models.io import find_tokenizer

logger = logging.getLogger(__name__)

SUMMARY_JSON = "glue_summary.json"
SUMMARY_MD = "glue_summary.md"
RUN_FILE = "metrics.json"
METRIC_ABBREVIATIONS = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson",
                        "spearman": "Spearman"}


@dataclass
class RunResult:
    """One (task, seed) run: dev metrics per entry and what the run did."""

    task: str
    seed: int
    dev: dict[str, dict[str, float]]
    learning_rate: float
    steps: int
    train_loss: float
    seconds: float
    earlybert: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "dev": self.dev, "learning_rate": self.learning_rate,
                "steps": self.steps, "train_loss": self.train_loss, "seconds": round(self.seconds, 3),
                "earlybert": self.earlybert, "losses": self.losses,
                "learning_rates": self.learning_rates}


# --- schedule and DeepSpeed config ----------------------------------------------------------------------------------

def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at optimizer step `step` (transformers' linear schedule with warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def training_steps(settings: TaskSettings, micro_batches_per_epoch: int, accumulation: int,
                   max_steps: int | None) -> int:
    """Optimizer steps of a run: `epochs` passes over the data (fractions allowed), capped by `max_steps`."""
    steps = max(1, math.ceil(settings.epochs * micro_batches_per_epoch) // accumulation)
    return min(steps, max_steps) if max_steps is not None else steps


def deepspeed_config(base: Mapping[str, Any], settings: TaskSettings, weight_decay: float,
                     world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one run: the glue block's batch size split into micro-batches x accumulation x
    ranks, and its learning rate / weight decay in the optimizer block (AdamW unless the file names another)."""
    config = copy.deepcopy(dict(base))
    batch = settings.batch_size
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is None:
        if batch % world_size:
            raise ConfigError(f"'glue.batch_size' = {batch} is not divisible by the {world_size} ranks")
        micro = batch // world_size
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 or batch % (micro * world_size):
        raise ConfigError(f"'glue.batch_size' = {batch} is not a multiple of 'train_micro_batch_size_per_gpu' = "
                          f"{micro} x {world_size} ranks")
    config.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=batch // (micro * world_size))
    optimizer = copy.deepcopy(config.get("optimizer") or {"type": "AdamW"})
    optimizer["params"] = {**optimizer.get("params", {}), "lr": settings.learning_rate, "weight_decay": weight_decay}
    config["optimizer"] = optimizer
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases, LayerNorms and slimming coefficients (BERT's recipe; the
    coefficients have their own L1 penalty)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.endswith(("bias", "_coef")) or "norm" in name
        (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: SequenceClassifier, config: dict[str, Any], weight_decay: float, warmup: int, total: int,
                 start_step: int = 0) -> DsPldEngine:
    """A DeepSpeed engine whose schedule starts at optimizer step `start_step` (non-zero after an EarlyBERT draw)."""
    def scheduler(optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: linear_warmup_decay(step + start_step, warmup, total))

    engine, *_ = ds_pld.initialize(model=model, model_parameters=parameter_groups(model, weight_decay),
                                   lr_scheduler=scheduler, config=config)
    return engine


# --- evaluation -----------------------------------------------------------------------------------------------------

def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def predict(engine: DsPldEngine, dataset: Dataset, collate: Callable, batch_size: int,
            regression: bool) -> np.ndarray:
    """Predictions for every example of `dataset`, in order. Each rank runs an equal share (the last shares are
    padded with repeats, which ZeRO-3 needs: every rank must run the same number of forwards), then they are
    gathered."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = len(dataset)
    share = math.ceil(size / world)
    indices = [rank + i * world for i in range(share)]
    features = dataset.remove_columns([c for c in ("label",) if c in dataset.column_names])
    was_training = engine.module.training
    engine.eval()
    mine: list[tuple[int, float]] = []
    for start in range(0, share, batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([features[i % size] for i in chunk])
        logits = engine(**_to_device(batch, engine.device)).logits.float().cpu()
        values = logits.squeeze(-1) if regression else logits.argmax(-1)
        mine.extend((i, float(v)) for i, v in zip(chunk, values.tolist()) if i < size)
    engine.train(was_training)
    gathered: list[list[tuple[int, float]]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    predictions = np.empty(size, dtype=float)
    for index, value in (pair for part in gathered for pair in part):
        predictions[index] = value
    return predictions if regression else predictions.astype(int)


def evaluate(engine: DsPldEngine, task: GlueTask, dev: Mapping[str, Dataset], collate: Callable,
             batch_size: int) -> dict[str, dict[str, float]]:
    """GLUE metrics of every dev entry (`rte`, or `mnli-m` and `mnli-mm`)."""
    out = {}
    for name, dataset in dev.items():
        predictions = predict(engine, dataset, collate, batch_size, task.is_regression)
        out[task.entry_name(name)] = compute_metrics(task, predictions, dataset["label"])
    return out


# --- EarlyBERT ------------------------------------------------------------------------------------------------------

def full_precision_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole and in fp32 (the optimizer's master copy under mixed precision / ZeRO), on the CPU.
    A collective under ZeRO: call it on every rank."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: coefficient_values(param, name).clone() for name, param in params.items()}


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def prune_classifier(model: SequenceClassifier, ticket: Ticket, state: Mapping[str, torch.Tensor]
                     ) -> SequenceClassifier:
    """A classifier whose encoder holds only the ticket's heads and neurons (weights from `state`, coefficients
    folded in), with the head from `state` too."""
    slim = prune_model(model.bert, ticket, state_dict=_strip(state, "bert."))
    pruned = SequenceClassifier(slim, model.num_labels, model.classifier.dropout.p)
    pruned.classifier.load_state_dict(_strip(state, "classifier."))
    return pruned


def draw_and_rebuild(earlybird: EarlyBird, step: int, engine: DsPldEngine, rewind_state: dict | None,
                     config: dict[str, Any], weight_decay: float, warmup: int, total: int
                     ) -> tuple[DsPldEngine, dict[str, Any]]:
    """Draw the ticket, prune the encoder, and replace the engine by one for the new shapes whose schedule continues
    at `step`. Returns the new engine and what to record about the draw. A collective: call it on every rank."""
    ticket = earlybird.draw(step, engine.module)
    state = rewind_state if rewind_state is not None else full_precision_state(engine.module)
    model = prune_classifier(engine.module, ticket, state)
    engine.destroy()
    new_engine = build_engine(model, config, weight_decay, warmup, total, start_step=step)
    info = {"drawn_at_step": step, "distance": earlybird.last_distance, "ticket": ticket.to_dict(), **ticket.summary()}
    return new_engine, info


def _widths(config: BertConfig) -> dict[str, list[int]]:
    layers = range(config.num_layers)
    return {"layer_heads": [config.heads(i) for i in layers],
            "layer_intermediate": [config.intermediate(i) for i in layers]}


# --- one run --------------------------------------------------------------------------------------------------------

def finetune_run(task: GlueTask, seed: int, pretrained: BertForPreTraining, train: Dataset,
                 dev: Mapping[str, Dataset], tokenizer: PreTrainedTokenizerBase, glue: GlueConfig,
                 base_config: Mapping[str, Any], max_steps: int | None = None) -> RunResult:
    """Fine-tune a copy of `pretrained` on one task with one seed and evaluate it on the dev entries."""
    started = time.perf_counter()
    settings = glue.settings(task.name)
    world, rank = dist.get_world_size(), dist.get_rank()
    set_seed(seed)
    bert = copy.deepcopy(pretrained)
    model = SequenceClassifier(bert, task.num_labels, glue.classifier_dropout)
    config = deepspeed_config(base_config, settings, glue.weight_decay, world)
    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    collate = collator(tokenizer)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(train, batch_size=micro, sampler=sampler, collate_fn=collate)
    total = training_steps(settings, len(loader), accumulation, max_steps)
    warmup = int(settings.warmup_ratio * total)
    earlybird = EarlyBird(glue.earlybert) if glue.earlybert is not None else None
    rewind_state = copy.deepcopy(model.state_dict()) if earlybird is not None and glue.earlybert.rewind else None
    engine = build_engine(model, config, glue.weight_decay, warmup, total)
    offset = 0  # optimizer steps taken by engines replaced after an EarlyBERT draw
    losses: list[float] = []  # mean loss of each optimizer step (this rank's micro-batches)
    learning_rates: list[float] = []  # the learning rate each optimizer step used
    step_loss, step_micro = 0.0, 0
    eb_info: dict[str, Any] | None = None if earlybird is None else {"drawn_at_step": None}
    epoch = 0
    while offset + engine.global_steps < total:
        sampler.set_epoch(epoch)
        for batch in loader:
            if step_micro == 0:
                learning_rates.append(float(engine.get_lr()[0]))
            out = engine(**_to_device(batch, engine.device))
            loss = out.loss
            searching = earlybird is not None and not earlybird.drawn
            if searching:
                loss = loss + earlybird.penalty(engine.module)
            engine.backward(loss)
            before = engine.global_steps
            engine.step()
            step_loss, step_micro = step_loss + out.loss.item(), step_micro + 1
            if engine.global_steps == before:
                continue
            losses.append(step_loss / step_micro)
            step_loss, step_micro = 0.0, 0
            step = offset + engine.global_steps
            if searching:
                earlybird.observe(step, engine.module)
                if earlybird.should_draw(step):
                    engine, eb_info = draw_and_rebuild(earlybird, step, engine, rewind_state, config,
                                                       glue.weight_decay, warmup, total)
                    offset = step
                    if rank == 0:
                        logger.info("%s seed %d: EarlyBERT ticket drawn at step %d: heads %s, neurons %s", task.name,
                                    seed, step, eb_info["earlybert_kept_heads"], eb_info["earlybert_kept_neurons"])
            if step >= total:
                break
        epoch += 1
    dev_metrics = evaluate(engine, task, dev, collate, glue.eval_batch_size)
    if eb_info is not None:
        eb_info.update(_widths(engine.module.config))
    engine.destroy()
    tail = losses[-max(1, len(losses) // 10):]
    return RunResult(task=task.name, seed=seed, dev=dev_metrics, learning_rate=settings.learning_rate,
                     steps=offset + engine.global_steps, train_loss=float(np.mean(tail)),
                     seconds=time.perf_counter() - started, earlybert=eb_info, losses=losses,
                     learning_rates=learning_rates)


# --- summary --------------------------------------------------------------------------------------------------------

def _entry_order(entry: str) -> tuple[int, str]:
    return (TABLE_ORDER.index(entry) if entry in TABLE_ORDER else len(TABLE_ORDER), entry)


def _display(entry: str) -> str:
    task, _, dev = entry.partition("-")
    name = get_task(task).display
    return f"{name}-{dev}" if dev else name


def summarize(results: list[RunResult], how: str, model: str | None = None) -> dict[str, Any]:
    """Per entry: the metrics of every seed, their aggregate (`how`: median or mean, per metric), and the entry
    score = aggregate over seeds of the per-seed score (mean of the entry's metrics, x100); then the GLUE average
    of the entry scores."""
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
    scores = {entry: item["score"] for entry, item in ordered.items()}
    return {"model": None if model is None else str(model), "aggregate": how,
            "seeds": sorted({result.seed for result in results}), "entries": ordered,
            "glue_average": glue_average(scores),
            "average_over": [e for e in ordered if e.split("-")[0] not in EXCLUDED_FROM_AVERAGE],
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


def _json_safe(value: Any) -> Any:
    """NaN (a constant-prediction correlation) is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: Mapping[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / SUMMARY_JSON, output_dir / SUMMARY_MD
    json_path.write_text(json.dumps(_json_safe(summary), indent=2))
    md_path.write_text(summary_markdown(summary))
    return json_path, md_path


# --- the job --------------------------------------------------------------------------------------------------------

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
    glue, base = parse_glue_config(deepspeed_config)
    glue = glue.with_overrides(epochs=epochs, seeds=seeds)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"--max_steps = {max_steps!r} must be a positive integer")
    task_list = parse_tasks(tasks)
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
    """Fine-tune on every task with every seed, write `<output_dir>/<task>/seed<k>/metrics.json` and the summary
    (`glue_summary.json`, `glue_summary.md`), and return the summary. Needs an initialized torch.distributed."""
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
                (run_dir / RUN_FILE).write_text(json.dumps(_json_safe(result.to_dict()), indent=2))
                logger.info("%s seed %d: %d steps, loss %.4f, dev %s", task.display, seed, result.steps,
                            result.train_loss, json.dumps(result.dev))
    summary = summarize(results, glue.aggregate, str(model))
    if rank == 0:
        json_path, md_path = write_summary(summary, output_dir)
        logger.info("summary: %s, %s\n%s", json_path, md_path, summary_markdown(summary))
    dist.barrier()
    return summary
