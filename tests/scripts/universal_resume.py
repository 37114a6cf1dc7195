"""Run by tests/test_reliability.py through the `deepspeed` launcher, twice: `save` on N ranks trains a few ZeRO steps,
checkpoints, and has rank 0 write every parameter's full fp32 weights and Adam moments to argv[3]; `load` on another
number of ranks resumes that checkpoint through `ds_pld.initialize`'s engine and checks the same full tensors are
back, bit for bit (exit 1 naming the first tensor that differs)."""
from __future__ import annotations

import sys

import torch
from deepspeed import comm as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import ds_pld
from ds_pld.models import build_model
from ds_pld.training.distributed import init_distributed, shutdown_distributed

VOCAB, SEQ, STEPS = 64, 16, 3


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every rank takes part (the getters all-reduce the partitions); rank 0 keeps the result."""
    state = {}
    for name, param in engine.module.named_parameters():
        state[f"{name}:fp32"] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}:{key}"] = safe_get_full_optimizer_state(param, key).detach().clone()
    return state


def main(mode: str, checkpoint_dir: str, reference: str, stage: int) -> int:
    init_distributed()
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=VOCAB, num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
              "zero_optimization": {"stage": stage}}
    engine, *_ = ds_pld.initialize(model=model, config=config)
    status = 0
    if mode == "save":
        generator = torch.Generator().manual_seed(100 + dist.get_rank())
        for _ in range(STEPS):
            ids = torch.randint(5, VOCAB, (2, SEQ), generator=generator)
            engine.backward(engine(ids, labels=ids).loss)
            engine.step()
        engine.save_checkpoint(checkpoint_dir)
        state = full_state(engine)
        if dist.get_rank() == 0:
            torch.save(state, reference)
    else:
        engine.load_checkpoint(checkpoint_dir)
        state = full_state(engine)
        if dist.get_rank() == 0:
            expected = torch.load(reference)
            differ = [key for key in expected if not torch.equal(expected[key], state[key])]
            print(f"ranks {dist.get_world_size()}, step {engine.global_steps}: {len(expected)} tensors, "
                  f"{len(differ)} differ {differ[:3]}", flush=True)
            status = 1 if differ or engine.global_steps != STEPS or set(expected) != set(state) else 0
    shutdown_distributed()
    return status


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    sys.exit(main(args[0], args[1], args[2], int(args[3])))
