"""One GLUE fine-tuning run: a fresh classifier on a copy of the pretrained encoder, trained for one (task, seed)
through `ds_pld.initialize` and evaluated on the dev entries (ds_pld.glue.job runs every task and seed).

EarlyBERT fine-tuning mode (a `glue.earlybert` block, Chen et al. 2021) is the same algorithm as in pretraining
(ds_pld.algorithms.EarlyBert): the encoder gets slimming coefficients, the L1 penalty joins the loss while
searching, and when the detector draws, the encoder is pruned physically (the classifier head is kept) and the
engine rebuilt at the same step, the learning-rate schedule continuing and Adam's moments carried where the
optimizer allows; training goes on until the run's step budget is spent. With `rewind`, the pruned model starts
from the weights before the search. PLD, when the DeepSpeed config turns it on, is
ds_pld.algorithms.ProgressiveLayerDropping as well: each step's theta goes into `pld_thetas`.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase, set_seed

from ds_pld.algorithms import EarlyBert, Event, State, build_algorithms, optimizer_step, run_event
from ds_pld.glue.config import GlueConfig
from ds_pld.glue.data import collator
from ds_pld.glue.evaluate import evaluate, to_device
from ds_pld.glue.model import SequenceClassifier, prune_classifier
from ds_pld.glue.optimization import build_engine, deepspeed_config, training_steps
from ds_pld.glue.tasks import GlueTask
from ds_pld.models.bert import BertForPreTraining
from ds_pld.plugin_state import plugin_of
from ds_pld.training.divergence import DivergenceGuard, TrainingDiverged

logger = logging.getLogger(__name__)


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
    pld_thetas: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "dev": self.dev, "learning_rate": self.learning_rate,
                "steps": self.steps, "train_loss": self.train_loss, "seconds": round(self.seconds, 3),
                "earlybert": self.earlybert, "losses": self.losses,
                "learning_rates": self.learning_rates, "pld_thetas": self.pld_thetas}


def _epochs(loader: DataLoader, sampler: DistributedSampler) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch, each epoch shuffled anew."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def finetune_run(task: GlueTask, seed: int, pretrained: BertForPreTraining, train: Dataset,
                 dev: Mapping[str, Dataset], tokenizer: PreTrainedTokenizerBase, glue: GlueConfig,
                 base_config: Mapping[str, Any], max_steps: int | None = None) -> RunResult:
    """Fine-tune a copy of `pretrained` on one task with one seed and evaluate it on the dev entries."""
    started = time.perf_counter()
    settings = glue.settings(task.name)
    world, rank = dist.get_world_size(), dist.get_rank()
    set_seed(seed)
    model = SequenceClassifier(copy.deepcopy(pretrained), task.num_labels, glue.classifier_dropout)
    config = deepspeed_config(base_config, settings, glue.weight_decay, world)
    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    collate = collator(tokenizer)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(train, batch_size=micro, sampler=sampler, collate_fn=collate)
    total = training_steps(settings, len(loader), accumulation, max_steps)
    warmup = int(settings.warmup_ratio * total)

    first = build_engine(model, config, glue.weight_decay, warmup, total)
    pld = plugin_of(first).pld  # made by ds_pld.initialize when the DeepSpeed config turns PLD on

    def engine_for(module: SequenceClassifier, start_step: int = 0) -> DeepSpeedEngine:
        return build_engine(module, config, glue.weight_decay, warmup, total, start_step, pld=pld)

    state = State(first, engine_for)
    algorithms = build_algorithms(pld, glue.earlybert, prune=prune_classifier)
    earlybert = next((a for a in algorithms if isinstance(a, EarlyBert)), None)
    batches = _epochs(loader, sampler)
    losses: list[float] = []  # mean loss of each optimizer step (this rank's micro-batches)
    learning_rates: list[float] = []  # the learning rate each optimizer step used
    pld_thetas: list[float] = []  # PLD's theta of each step, when the DeepSpeed config turns PLD on
    guard = DivergenceGuard()  # the pretraining loop's check; no checkpoints here, so a divergence ends the run
    while state.step < total:
        learning_rates.append(float(state.engine.get_lr()[0]))
        micro_batches = (to_device(batch, state.engine.device) for batch in itertools.islice(batches, accumulation))
        result = optimizer_step(state, algorithms, micro_batches)
        flag = guard.flag(state.engine, result.loss_sum)
        dist.all_reduce(flag)  # every rank takes the same decision
        losses.append(float(result.mean_loss))
        state.record = {"non_finite": float(flag)}
        try:
            record = run_event([guard, *algorithms], Event.STEP_END, state)
        except TrainingDiverged:
            raise RuntimeError(f"fine-tuning {task.display} with seed {seed} diverged at step {state.step}: the loss "
                               f"or the gradient norm is not finite; lower 'glue.learning_rate' "
                               f"({settings.learning_rate:g})") from None
        if "pld_theta" in record:
            pld_thetas.append(record["pld_theta"])
        if "earlybert_drawn_step" in record and rank == 0:
            logger.info("%s seed %d: EarlyBERT ticket drawn at step %d: heads %s, neurons %s", task.name, seed,
                        state.step, record["earlybert_kept_heads"], record["earlybert_kept_neurons"])
    dev_metrics = evaluate(state.engine, task, dev, collate, glue.eval_batch_size)
    info = None if earlybert is None else {**earlybert.report(), **_widths(state.model.config)}
    steps = state.step
    state.engine.destroy()
    tail = losses[-max(1, len(losses) // 10):]
    return RunResult(task=task.name, seed=seed, dev=dev_metrics, learning_rate=settings.learning_rate, steps=steps,
                     train_loss=float(np.mean(tail)), seconds=time.perf_counter() - started, earlybert=info,
                     losses=losses, learning_rates=learning_rates, pld_thetas=pld_thetas)


def _widths(config: Any) -> dict[str, list[int]]:
    layers = range(config.num_layers)
    return {"layer_heads": [config.heads(i) for i in layers],
            "layer_intermediate": [config.intermediate(i) for i in layers]}
