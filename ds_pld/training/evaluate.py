"""Validation during pretraining: MLM loss and accuracy on a fixed slice of the validation split with fixed masks,
so the numbers are comparable over time and across runs; `Evaluation` runs it every `eval_every` steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_pld.algorithms.base import Algorithm, Event, Metrics, State
from ds_pld.data import MLMMasker
from ds_pld.training.inputs import derived_seed, masked_batch

VALIDATION_STREAM = 7919  # keeps validation mask seeds apart from training's


@dataclass(frozen=True)
class Validation:
    """What a validation pass reads: `batches` micro-batches of `micro_batch` rows per rank from `dataset`."""

    dataset: Dataset
    masker: MLMMasker
    micro_batch: int
    batches: int
    seed: int
    rank: int
    world_size: int

    @torch.no_grad()
    def score(self, engine: DeepSpeedEngine, dataset: Dataset | None = None, seed: int | None = None
              ) -> dict[str, float]:
        """Every layer run (eval mode), reduced over the ranks. `dataset` (default: the validation split) and `seed`
        (default: the run's; masks are drawn from it) let a study score runs of different seeds on the same masked
        sequences, or score a slice of the training data."""
        rows_from = self.dataset if dataset is None else dataset
        seed = self.seed if seed is None else seed
        engine.module.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for index in range(self.batches):
            start = (index * self.world_size + self.rank) * self.micro_batch
            rows = torch.stack([rows_from[(start + i) % len(rows_from)]["input_ids"] for i in range(self.micro_batch)])
            batch = masked_batch(self.masker, rows.long(), derived_seed(seed, VALIDATION_STREAM, index, self.rank),
                                 engine.device)
            out = engine(**batch)
            count = out.masked_labels.numel()
            totals += torch.tensor([out.loss.double().item() * count,
                                    (out.logits.argmax(-1) == out.masked_labels).sum().item(), count],
                                   dtype=torch.float64)
        totals = totals.to(engine.device)
        dist.all_reduce(totals)
        engine.module.train()
        return {"val_loss": float(totals[0] / totals[2].clamp(min=1)),
                "val_accuracy": float(totals[1] / totals[2].clamp(min=1))}


class Evaluation(Algorithm):
    """AFTER_STEP: validation metrics into the step's record every `every` steps and at the last step."""

    name = "evaluation"

    def __init__(self, validation: Validation, every: int, last_step: int):
        self.validation, self.every, self.last_step = validation, every, last_step

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_STEP and (state.step % self.every == 0 or state.step == self.last_step)

    def apply(self, event: Event, state: State) -> Metrics | None:
        return self.validation.score(state.engine)
