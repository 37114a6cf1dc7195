"""Resuming a ZeRO checkpoint on another number of ranks (issues 13, 19): DeepSpeed refuses partitioned optimizer
state written by another world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported"); ds_pld's engine re-shards it through DeepSpeed's universal checkpoint. Real ranks
through the `deepspeed` launcher on both sides: every parameter's fp32 weights and optimizer moments must come back
bit for bit at ZeRO-1, -2 and -3, with Adam and with ds_pld's LAMB, and the trainer's `--allow_world_size_change`
must carry a run on from its checkpoint. (The resume without the flag is refused in tests/test_reliability.py.)"""
from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT, run_deepspeed, tiny_train_config
from test_train import TRAIN, env

from ds_pld.checkpoints import read_checkpoint_meta
from ds_pld.universal_checkpoint import needs_resharding

SCRIPT = str(ROOT / "tests" / "scripts" / "universal_resume.py")


def test_resharding_compares_data_parallel_sizes() -> None:
    """ZeRO partitions over the data-parallel ranks: 4 ranks with sequence parallelism 2 wrote 2 partitions, which
    2 data-parallel ranks load as they are; an older checkpoint without the data-parallel size falls back to the
    global one; ZeRO-0 and universal checkpoints never need it."""
    meta = {"world_size": 4, "dp_world_size": 2}
    assert not needs_resharding(meta, dp_world_size=2, zero_stage=2)
    assert needs_resharding(meta, dp_world_size=4, zero_stage=2)
    assert needs_resharding({"world_size": 4}, dp_world_size=2, zero_stage=1)
    assert not needs_resharding({"world_size": 4}, dp_world_size=4, zero_stage=3)
    assert not needs_resharding(meta, dp_world_size=1, zero_stage=0)
    assert not needs_resharding({**meta, "universal": True}, dp_world_size=1, zero_stage=2)


@pytest.mark.slow
# Cases are `STAGE-OPTIMIZER`; the cases of one row share its two launches. ZeRO-3 partitions the weights as well as
# the optimizer state, and 1 -> 2 splits what one rank wrote; 2 -> 1 merges ZeRO-1/2 partitions, with LAMB (two
# param groups) and with Adam. Every stage and both optimizers in four launches, not one pair per combination.
@pytest.mark.parametrize(("cases", "saved_on", "resumed_on"), [("3-adamw", 1, 2), ("1-lamb,2-adamw", 2, 1)])
def test_zero_checkpoint_resumes_on_another_world_size(tmp_path, cases, saved_on, resumed_on):
    checkpoints, reference = tmp_path / "checkpoints", tmp_path / "reference.pt"
    run_deepspeed([SCRIPT, "save", str(checkpoints), str(reference), cases], num_ranks=saved_on)
    loaded = run_deepspeed([SCRIPT, "load", str(checkpoints), str(reference), cases], num_ranks=resumed_on)
    for case in cases.split(","):
        line = next((line for line in loaded.stdout.splitlines() if line.startswith(f"case {case}: ")), "")
        assert f"ranks {resumed_on}, step 3: " in line and " 0 differ" in line, loaded.stdout[-3000:]
        assert "optimizer steps [3]" in line, line  # the step count bias correction reads came back too
        assert not (checkpoints / case / "universal").exists()  # the derived copy is gone; the original stays
        assert (checkpoints / case / "global_step3" / "ds_pld_meta.json").is_file()
    assert loaded.stdout.count(f"re-sharding it for {resumed_on}") == len(cases.split(","))


@pytest.mark.slow
def test_trainer_resumes_a_two_rank_zero_run_on_one_rank_with_allow_world_size_change(prepared, tmp_path):
    """ZeRO-2 with ds_pld's LAMB: 2 ranks stop at step 4 (checkpoint, exit 0); `deepspeed --num_gpus 1 ... --resume
    --allow_world_size_change` re-shards that checkpoint and trains on to max_steps: the steps continue (no
    restart), the learning rate continues its linear decay, LAMB's trust ratios are back, final/ is written."""
    lamb = {"type": "Lamb", "params": {"lr": 3e-3, "weight_decay": 0.01, "exclude_from_weight_decay": ["bias", "norm"]}}
    config = tiny_train_config(tmp_path / "config.json", prepared,
                               {"max_steps": 8, "checkpoint_every": 4, "eval_every": 8},
                               optimizer=lamb, zero_optimization={"stage": 2}, wandb={"enabled": False})
    out = tmp_path / "out"
    args = [TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out)]
    run_deepspeed([*args, "--stop_at_step", "4"], env=env())
    assert read_checkpoint_meta(out / "checkpoints")["world_size"] == 2 and not (out / "final").exists()

    resumed = run_deepspeed([*args, "--resume", "--allow_world_size_change"], num_ranks=1, env=env())
    log = resumed.stdout + resumed.stderr
    assert "global_step4' from 2 on 1 rank(s) (--allow_world_size_change)" in log, log[-3000:]
    assert "partitioned over 2 data-parallel rank(s) by ZeRO; re-sharding it for 1" in log, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)), "the resume restarted or repeated steps"
    lrs = [r["lr"] for r in records]
    assert all(math.isclose(a - b, lrs[0] - lrs[1], rel_tol=1e-6) for a, b in zip(lrs, lrs[1:])), lrs
    assert all(math.isfinite(r["loss"]) and r["trust_ratio_max"] > 0 for r in records[4:]), records[4:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    assert (out / "final" / "model.safetensors").is_file()
    assert read_checkpoint_meta(out / "checkpoints")["world_size"] == 1
    assert not (out / "checkpoints" / "universal").exists()
