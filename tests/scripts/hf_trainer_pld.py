"""Run on 2 ranks by tests/test_hf_trainer.py: Hugging Face `Trainer` trains transformers'
RobertaPreLayerNormForMaskedLM with ds_pld's PLD adapter and callback twice, under DistributedDataParallel and with a
DeepSpeed config (ZeRO-2, CPU); then Trainers with set-ups PLD cannot serve (ZeRO-3, DDP that expects every parameter
to get a gradient) must be refused when they are built. Each rank writes what it saw to <out>/rank<r>.json (<out>:
the last argument); the test checks that the ranks agree."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from transformers import (
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ds_pld.integrations.transformers import PLDAdapter, PLDCallback
from ds_pld.training.distributed import init_distributed, shutdown_distributed

VOCAB, SEQ, LAYERS, STEPS, ACCUMULATION = 64, 12, 4, 4, 2
DEEPSPEED = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}


class Recorder(TrainerCallback):
    """What the adapter drew in each optimizer step and which layers hold a gradient, just before the optimizer
    steps (under DeepSpeed the gradients live in its partitions, so only the draws say anything there)."""

    def __init__(self, adapter: PLDAdapter):
        self.adapter = adapter
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        has_grad = [any(p.grad is not None for p in layer.parameters()) for layer in self.adapter.encoder.layer]
        self.steps.append({"step": state.global_step, "theta": self.adapter.theta,
                           "masks": [list(mask) for mask in self.adapter.step_masks], "has_grad": has_grad})


def dataset() -> list[dict[str, torch.Tensor]]:
    """Random MLM samples: 30% of the positions are labelled."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(64):
        ids = torch.randint(5, VOCAB, (SEQ,), generator=generator)
        labels = torch.where(torch.rand(SEQ, generator=generator) < 0.3, ids, -100)
        samples.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return samples


def pld_model() -> tuple[RobertaPreLayerNormForMaskedLM, PLDAdapter]:
    torch.manual_seed(0)
    config = RobertaPreLayerNormConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ + 2,
                                       type_vocab_size=1, pad_token_id=1, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
    model = RobertaPreLayerNormForMaskedLM(config)
    return model, PLDAdapter(model, theta=0.5, gamma=1.0, seed=3)


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, weight_decay=0.0,
                             logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, **overrides)


def train(out: Path, **overrides: Any) -> dict[str, Any]:
    model, adapter = pld_model()
    recorder = Recorder(adapter)
    trainer = Trainer(model=model, args=arguments(out, **overrides), train_dataset=dataset(),
                      callbacks=[PLDCallback(adapter), recorder])
    trainer.train()
    logged = [{"step": entry["step"], "pld_theta": entry["pld_theta"]}
              for entry in trainer.state.log_history if "pld_theta" in entry]
    return {"global_step": trainer.state.global_step, "steps": recorder.steps, "logged": logged,
            "wrapper": type(trainer.model_wrapped).__name__}


def refusal(out: Path, **overrides: Any) -> str | None:
    """The error `Trainer(...)` raises for a set-up PLD cannot serve (None: it was accepted)."""
    model, adapter = pld_model()
    try:
        Trainer(model=model, args=arguments(out, **overrides), train_dataset=dataset(),
                callbacks=[PLDCallback(adapter)])
    except ValueError as err:
        return str(err)
    return None


def main() -> None:
    out_dir = Path(sys.argv[-1])  # the launcher puts --local_rank before it
    init_distributed()  # before the Trainer's own init: it also releases DeepSpeed's shared-memory segment names
    result = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(),
        "ddp": train(out_dir / "ddp", use_cpu=True, ddp_find_unused_parameters=True),  # use_cpu: DDP on CPUs
        "ddp_refusal": refusal(out_dir / "ddp_strict", use_cpu=True, ddp_find_unused_parameters=False),
        "deepspeed": train(out_dir / "deepspeed", deepspeed=DEEPSPEED),
        "zero3_refusal": refusal(out_dir / "zero3", deepspeed={**DEEPSPEED, "zero_optimization": {"stage": 3}}),
    }
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
