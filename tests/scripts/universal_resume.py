"""Run by tests/test_universal_checkpoint.py through the `deepspeed` launcher, twice, on one or more cases
(`STAGE-OPTIMIZER`, comma-separated: `3-adamw`, `1-lamb,2-adamw`). `save` on N ranks trains each case's engine a few
ZeRO steps, checkpoints it into `<dir>/<case>`, and has rank 0 write every parameter's full fp32 weights and optimizer
moments to argv[3]; `load` on another number of ranks resumes each checkpoint and checks the same full tensors are
back bit for bit, and that every optimizer state's step count is back (Adam's and LAMB's bias correction read it),
then takes one more step (exit 1 naming the first tensor that differs). Several cases share one launch: a launch
costs far more than a case."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from deepspeed import comm as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import ds_pld
from ds_pld.models import build_model
from ds_pld.training.distributed import init_distributed, shutdown_distributed


# The checkpoint calls under test, in one place for when their API moves.
def save(engine, directory: Path, tag: str | None = None) -> None:
    ds_pld.save_checkpoint(engine, directory, tag)


def load(engine, directory: Path, tag: str | None = None) -> None:
    ds_pld.load_checkpoint(engine, directory, tag)


VOCAB, SEQ, STEPS = 64, 16, 3
OPTIMIZERS = {
    "adamw": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    # ds_pld's own LAMB (ds_pld.optim): two param groups, the no-decay one without trust ratio
    "lamb": {"type": "Lamb",
             "params": {"lr": 1e-2, "weight_decay": 0.01, "exclude_from_weight_decay": ["bias", "norm"]}},
}
MOMENTS = ("exp_avg", "exp_avg_sq")  # the same keys in DeepSpeed's FusedAdam ("AdamW") and ds_pld's Lamb


def link_moments(engine) -> None:
    """DeepSpeed 0.19.8's ZeRO-1/2 links each parameter to its slice of the optimizer state once, right after the
    first param group's first step. A base optimizer that creates its state per group when it steps that group
    (Lamb, two groups) leaves every later group unlinked, and safe_get_full_optimizer_state raises
    `exp_avg not found in optimizer state fragment` for their parameters. Link again now that every group has its
    state (no value changes; a universal-checkpoint load links every group itself)."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every rank takes part (the getters all-reduce the partitions); rank 0 keeps the result."""
    link_moments(engine)
    state = {}
    for name, param in engine.module.named_parameters():
        state[f"{name}:fp32"] = safe_get_full_fp32_param(param).detach().clone()
        for key in MOMENTS:
            state[f"{name}:{key}"] = safe_get_full_optimizer_state(param, key).detach().clone()
    return state


def optimizer_steps(engine) -> set[int]:
    """The step counts in this rank's base optimizer state, which bias correction reads (FusedAdam also keeps a
    `step` in each param group that stays 0)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {int(state["step"]) for state in base.state.values() if "step" in state}


def train_step(engine, generator: torch.Generator) -> float:
    ids = torch.randint(5, VOCAB, (2, SEQ), generator=generator)
    loss = engine(ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def run_case(mode: str, case: str, checkpoint_dir: Path, reference: dict) -> list[str]:
    """One case on this world size; returns its failures (rank 0 reports them)."""
    stage, optimizer = case.split("-")
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=VOCAB, num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": OPTIMIZERS[optimizer], "zero_optimization": {"stage": int(stage)}}
    engine, *_ = ds_pld.initialize(model=model, config=config)
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    failures = []
    if mode == "save":
        for _ in range(STEPS):
            train_step(engine, generator)
        save(engine, checkpoint_dir / case)
        reference[case] = full_state(engine)
    else:
        load(engine, checkpoint_dir / case)
        state, expected = full_state(engine), reference.get(case, {})
        differ = [key for key in expected if not torch.equal(expected[key], state[key])]
        steps = optimizer_steps(engine)
        loss = train_step(engine, generator)  # the re-sharded optimizer steps on
        if dist.get_rank() == 0:
            print(f"case {case}: ranks {dist.get_world_size()}, step {engine.global_steps - 1}: {len(expected)} "
                  f"tensors, {len(differ)} differ {differ[:3]}; optimizer steps {sorted(steps)}; next loss "
                  f"{loss:.4f}", flush=True)
        if differ or set(expected) != set(state) or not expected:
            failures.append(f"{case}: tensors differ or are missing")
        if engine.global_steps != STEPS + 1 or steps != {STEPS}:
            failures.append(f"{case}: engine step {engine.global_steps - 1}, optimizer steps {sorted(steps)}")
        if not math.isfinite(loss):
            failures.append(f"{case}: loss {loss} after the resume")
    if hasattr(engine, "destroy"):
        engine.destroy()
    return failures


def main(mode: str, checkpoint_dir: str, reference_path: str, cases: str) -> int:
    init_distributed()
    rank = dist.get_rank()
    reference = {} if mode == "save" else torch.load(reference_path)
    failures = [failure for case in cases.split(",") for failure in run_case(mode, case, Path(checkpoint_dir),
                                                                             reference)]
    if mode == "save" and rank == 0:
        torch.save(reference, reference_path)
    shutdown_distributed()
    for failure in failures:
        print(f"rank {rank} FAILED {failure}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    sys.exit(main(*args[:4]))
