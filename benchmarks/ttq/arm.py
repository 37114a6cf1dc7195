"""One arm of the study: a real `PretrainingRun` (the object behind `launch/train.py`, EarlyBERT's draw and engine
rebuild included) on one rank, stepped by the trainer's own `train_step`, with its learning rate and PLD theta set
from its budget before every step, and evaluated off the clock at fixed shares of the budget."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .budget import Budget, Clock, ClockKind, plan_steps
from .plan import RunSpec, StudySettings

EVAL_SEED = 20231  # validation masks: the same for every arm and seed
EVAL_POINTS = 12  # evaluations over the budget, besides the one at time 0


def run_config(run: RunSpec, settings: StudySettings, data: Path, seq: int, search_steps: int, eval_batches: int,
               bf16: bool) -> dict[str, Any]:
    """The ds_configs-style dict of one run. No `lr_schedule`: the study sets the learning rate from the budget."""
    config: dict[str, Any] = {
        "train_batch_size": settings.batch, "train_micro_batch_size_per_gpu": settings.batch,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": run.lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                  "weight_decay": 0.01}},
        "model": {"preset": "bert-base", "num_layers": settings.layers, "hidden_size": settings.hidden,
                  "num_heads": settings.heads, "intermediate_size": 4 * settings.hidden,
                  "max_position_embeddings": seq, "hidden_dropout": run.dropout, "attention_dropout": run.dropout,
                  "layer_norm": run.layer_norm},
        "data": {"path": str(data), **({"train_sequences": run.train_sequences} if run.train_sequences else {})},
        "training": {"max_steps": 10**9, "checkpoint_every": 10**9, "eval_every": 10**9,
                     "eval_batches": eval_batches, "seed": run.seed},
        "wandb": {"enabled": False},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    if run.uses_pld:
        # theta is set from the budget before every step; the step schedule below is never the one used.
        config["progressive_layer_drop"] = {"enabled": True, "theta": run.theta, "gamma": 0.0,
                                            "seed": run.seed}
    if run.uses_random_ltd:
        # DeepSpeed's block; the kept length is set from the budget before every step (Arm._schedule).
        middle = list(range(1, settings.layers - 1))
        config["data_efficiency"] = {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
            "enabled": True, "total_layer_num": settings.layers, "random_ltd_layer_num": len(middle),
            "random_ltd_layer_id": middle, "model_type": "encoder",
            "random_ltd_schedule": {"min_value": max(1, int(settings.ltd_start * seq)), "max_value": seq,
                                    "schedule_type": "fixed_linear",
                                    "schedule_config": {"require_steps": 10**9, "seq_per_step": 8}}}}}
    if run.uses_earlybert:
        config["earlybert"] = {
            "lambda_head": settings.earlybert_lambda, "lambda_ffn": settings.earlybert_lambda,
            "head_prune_ratio": settings.head_prune, "ffn_prune_ratio": settings.ffn_prune,
            "head_mode": "layerwise", "ffn_mode": "global", "check_every": max(1, search_steps // 10), "window": 3,
            "epsilon": 0.1, "max_search_steps": search_steps, "rewind": False}
    return config


def earlybert_search_steps(settings: StudySettings, step_seconds: float) -> int:
    """EarlyBERT's longest search: `search_fraction` of the budget at the full model's calibrated step time."""
    return max(2, plan_steps(Budget(settings.budget_s), step_seconds, settings.search_fraction))


class Arm:
    """A run on its own clock; `curve` holds the evaluations (time 0, then every 1/EVAL_POINTS of the budget)."""

    def __init__(self, spec: RunSpec, run: Any, budget: Budget, clock: ClockKind, device: str | None = None,
                 train_slice: Any = None, settings: StudySettings | None = None):
        self.spec, self.run, self.budget, self.settings = spec, run, budget, settings
        self.clock = Clock(clock, device)
        self.train_slice = train_slice  # a fixed slice of the training data, scored for the data-limited regime
        self.curve: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.layers_run: list[float] = []
        self.ltd_tokens: list[int] = []
        self.drawn_step: int | None = None
        self.diverged_at: int | None = None
        self.next_mark = 0.0

    @property
    def done(self) -> bool:
        return self.diverged_at is not None or self.budget.spent(self.clock.total)

    def evaluate(self) -> dict[str, float]:
        score = self.run.evaluation.validation.score
        point = {"time_s": self.clock.total, "step": self.run.step, **score(self.run.engine, seed=EVAL_SEED)}
        if self.train_slice is not None:
            scored = score(self.run.engine, dataset=self.train_slice, seed=EVAL_SEED)
            point.update(train_loss=scored["val_loss"], train_accuracy=scored["val_accuracy"])
        self.curve.append(point)
        self.next_mark = (len(self.curve)) * self.budget.seconds / EVAL_POINTS
        return point

    def _schedule(self) -> None:
        """The learning rate and theta of the step about to start, from the share of the budget spent."""
        engine = self.run.engine
        scale = self.budget.lr_multiplier(self.clock.total)
        for group in engine.optimizer.param_groups:
            group["lr"] = self.spec.lr * scale
        if self.spec.uses_pld:
            from ds_pld import plugin_of

            plugin_of(engine).pld.set_theta(self.budget.theta(self.clock.total, self.spec.theta))
        if self.spec.uses_random_ltd:
            from ds_pld import plugin_of

            settings, seq = self.settings, engine.module.config.max_position_embeddings
            plugin_of(engine).random_ltd.set_tokens(
                self.budget.tokens(self.clock.total, seq, settings.ltd_start, settings.ltd_full_at))

    def train(self, steps: int) -> None:
        from ds_pld.training.divergence import TrainingDiverged
        from ds_pld.training.step import train_step

        for _ in range(steps):
            if self.done:
                return
            self._schedule()
            self.clock.start()
            try:
                record, _ = train_step(self.run)
            except TrainingDiverged:
                self.clock.stop()
                self.diverged_at = self.run.step
                return
            self.step_times.append(self.clock.stop())
            self.layers_run.append(record["layers_run"])
            if "ltd_tokens" in record:
                self.ltd_tokens.append(record["ltd_tokens"])
            self.drawn_step = record.get("earlybert_drawn_step", self.drawn_step)
            record["clock_s"] = self.clock.total
            if self.done or self.clock.total >= self.next_mark:
                record.update(self.evaluate())
            self.run.metrics_log.write(record)  # the run folder's metrics.jsonl, as launch/train.py writes it

    def result(self) -> dict[str, Any]:
        median = statistics.median(self.step_times) if self.step_times else math.nan
        return {"steps": self.run.step, "train_time_s": self.clock.total, "clock": self.clock.kind,
                "median_step_s": median, "mean_layers_run": statistics.fmean(self.layers_run or [math.nan]),
                **({"mean_ltd_tokens": statistics.fmean(self.ltd_tokens)} if self.ltd_tokens else {}),
                "earlybert_drawn_step": self.drawn_step, "diverged_at": self.diverged_at,
                "epochs": self.run.batches.epoch(max(0, self.run.step - 1)) + 1,
                "model": self.run.engine.module.config.to_dict(), "curve": self.curve}
