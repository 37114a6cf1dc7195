"""The pretraining job end to end: 2 real ranks through the deepspeed launcher on the embedded default corpus."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launcher_env, run_deepspeed, tiny_train_config
from transformers import AutoModelForMaskedLM
from wandb_records import history, logged_steps, run_files, run_id

from ds_pld.config_errors import ConfigError
from ds_pld.export.hf import export_hf
from ds_pld.models.io import load_pretrained
from ds_pld.training.metrics import read_metrics
from ds_pld.training.run import resolve_batch_sizes

TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 12
FIELDS = {"step", "loss", "lr", "pld_theta", "expected_layers", "samples_per_sec", "layers_run"}


def env(**extra: str) -> dict[str, str]:
    return {**launcher_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def train(config: Path, out: Path, *flags: str, extra_env: dict[str, str] | None = None, check: bool = True):
    args = [TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out), *flags]
    if check:
        return run_deepspeed(args, env=env(**(extra_env or {})))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(__import__("conftest").free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank run, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("straight")
    train(tiny_train_config(tmp / "config.json", prepared), tmp / "out")
    return tmp / "out"


@pytest.mark.slow
def test_two_rank_run_learns_and_writes_metrics_plot_and_model(straight):
    records = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(FIELDS <= set(r) for r in records)
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, f"loss did not go down: {first} -> {last}"
    assert records[0]["pld_theta"] == 1.0 and records[-1]["pld_theta"] < 0.6
    assert any(r["layers_run"] < 3 for r in records), "PLD never dropped a layer"
    validation = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validation] == [6, 12] and 0 <= validation[-1]["val_accuracy"] <= 1
    assert (straight / "curves.png").stat().st_size > 10_000
    model = load_pretrained(straight / "final")
    assert model.config.num_layers == 3 and (straight / "final" / "tokenizer").is_dir()


@pytest.mark.slow
def test_wandb_offline_run_has_the_logged_keys(straight):
    runs = list((straight / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    rows = history(runs[0], wait_s=60)
    assert len(rows) == STEPS
    assert FIELDS <= set(rows[-1])
    assert json.loads(rows[0]["loss"]) == pytest.approx(losses(straight)[0])
    saved = json.loads((straight / "wandb_run.json").read_text())
    assert saved["id"] == run_id(runs[0], wait_s=60) and saved["mode"] == "offline"


@pytest.mark.slow
def test_stop_and_resume_equals_straight_through(prepared, straight, tmp_path):
    config = tiny_train_config(tmp_path / "config.json", prepared)
    out = tmp_path / "out"
    train(config, out, "--stop_at_step", "4")
    assert losses(out) == losses(straight)[:4]
    train(config, out, "--resume")
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    runs = run_files(out)
    assert {run_id(r) for r in runs} == {json.loads((out / "wandb_run.json").read_text())["id"]}, \
        "a resumed job must continue the same W&B run"
    assert [logged_steps(r, wait_s=60) for r in runs] == [list(range(1, 5)), list(range(5, STEPS + 1))], \
        "the first start closed its W&B run, so the second logs only its own steps"


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_resumable_run(prepared, straight, tmp_path):
    config = tiny_train_config(tmp_path / "config.json", prepared)
    out = tmp_path / "out"
    killed = train(config, out, extra_env={"DS_PLD_KILL_DURING_CHECKPOINT": "global_step8"}, check=False)
    assert killed.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "global_step8").is_dir(), "the kill should come after DeepSpeed wrote its files"
    assert (checkpoints / "latest").read_text() == "global_step4"
    train(config, out, "--resume")
    assert (checkpoints / "latest").read_text() == f"global_step{STEPS}"
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    # The killed start never closed its W&B run, so what its service wrote is unknown: the resumed start logs the
    # steps up to its checkpoint again from metrics.jsonl, then its own.
    assert logged_steps(run_files(out)[-1], wait_s=60) == list(range(1, STEPS + 1))


def test_batch_sizes_are_checked_against_the_world_size():
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}
    assert resolve_batch_sizes(ds, 2) == (4, 4) and ds["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_batch_sizes({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2)
    with pytest.raises(ConfigError, match="3 rank"):
        resolve_batch_sizes({"train_batch_size": 32}, 3)


@pytest.mark.parametrize("change, message", [
    ({"data": {"path": "/nonexistent/data"}}, "/nonexistent/data"),
    ({"model": {"preset": "bert-tiny", "max_position_embeddings": 16}}, "max_position_embeddings"),
    ({"training": {"max_stepz": 3}}, "max_stepz"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, "bad.json: 'train_batch_size'"),
    ({"gradient_clippin": 1.0}, "did you mean 'gradient_clipping'?"),
])
def test_bad_input_fails_before_training_naming_the_problem(prepared, tmp_path, change, message):
    config = json.loads(tiny_train_config(tmp_path / "config.json", prepared).read_text())
    config.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", str(path), "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, "a config error is one line, not a traceback"
    error = [line for line in proc.stderr.splitlines() if line.startswith("ConfigError: ")]
    assert len(error) == 1 and message in error[0], proc.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_quick_start_config_is_valid():
    from ds_pld.config import parse_config

    for name in ("cpu_small", "baseline", "pld"):
        config = parse_config(ROOT / "ds_configs" / f"{name}.json")
        assert config.model is not None
    assert parse_config(ROOT / "ds_configs" / "pld.json").pld.theta == 0.5
    assert os.path.isfile(TRAIN)


RANDOM_LTD = {"enabled": True, "total_layer_num": 3, "random_ltd_layer_num": 1, "random_ltd_layer_id": [1],
              "model_mask_name": "attention_mask", "model_type": "encoder", "hidden_state_order": "batch_seq_dim",
              "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                      "schedule_config": {"require_steps": 10, "seq_per_step": 8}}}


def deepspeed_token_schedule(block: dict, steps: int) -> list[int]:
    """The kept length of each step 1..steps by DeepSpeed's own scheduler, fed as its engine feeds it."""
    from deepspeed.runtime.data_pipeline.data_routing.scheduler import RandomLTDScheduler

    scheduler = RandomLTDScheduler({**block, "global_batch_size": 16, "layer_token_lr_schedule": {"enabled": False}})
    kept = []
    for step in range(steps):
        scheduler.update_seq(step)
        kept.append(scheduler.get_current_seq())
    return kept


@pytest.mark.slow
def test_earlybert_with_pld_and_random_ltd_under_zero3_searches_draws_prunes_and_resumes(prepared, tmp_path):
    """The three speed-ups together under ZeRO-3 on 2 ranks: EarlyBERT searches and draws while PLD drops layers
    and random-LTD drops tokens; the coefficients are read through the partitioned fp32 masters, the model is
    gathered, pruned and re-partitioned by a rebuilt engine that continues DeepSpeed's token schedule, and a resume
    rebuilds the slim model from the sharded checkpoint and keeps that schedule; the Hugging Face export of the
    result carries no random-LTD state and computes the same logits over every token."""
    config = json.loads(tiny_train_config(tmp_path / "config.json", prepared,
                                          zero_optimization={"stage": 3}).read_text())
    config["model"]["num_heads"] = 4
    config["earlybert"] = {"lambda_head": 1e-2, "lambda_ffn": 1e-2, "check_every": 1, "window": 2, "epsilon": 0.5,
                           "max_search_steps": 5, "head_prune_ratio": 0.25, "ffn_prune_ratio": 0.4}
    config["data_efficiency"] = {"enabled": True, "data_routing": {"enabled": True, "random_ltd": RANDOM_LTD}}
    config["wandb"] = {"enabled": False}
    path = tmp_path / "earlybert.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    train(path, out, "--stop_at_step", "8")
    saved = out / "checkpoints" / "global_step8"
    states = torch.load(saved / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["ds_config"]["zero_optimization"]["stage"] == 3
    assert states["random_ltd"]["current_value"] == deepspeed_token_schedule(RANDOM_LTD, 8)[-1]
    meta = json.loads((saved / "ds_pld_meta.json").read_text())
    assert meta["model_config"]["layer_heads"] == [3, 3, 3] and not meta["model_config"]["slimming"]
    assert sum(meta["model_config"]["layer_intermediate"]) == round(0.6 * 3 * 512)
    train(path, out, "--resume")  # the slim model is rebuilt and re-partitioned from the ZeRO-3 checkpoint
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    drawn = [r for r in records if "earlybert_drawn_step" in r]
    assert len(drawn) == 1 and drawn[0]["step"] <= 5, "the ticket must be drawn once, within the search limit"
    assert any("earlybert_distance" in r for r in records)
    assert drawn[0]["earlybert_heads"] == 3 * 3, "one of four heads pruned in each of the 3 layers"
    after = [r for r in records if r["step"] > drawn[0]["step"]]
    assert after and all(math.isfinite(r["loss"]) for r in records)
    assert any(r["layers_run"] < 3 for r in after), "PLD stays on after the draw"
    schedule = deepspeed_token_schedule(RANDOM_LTD, STEPS)
    assert [r["ltd_tokens"] for r in records] == schedule and schedule[0] == 8 and schedule[-1] == 32
    assert all(b["ltd_layer_tokens"] > a["ltd_layer_tokens"] for a, b in zip(records, records[1:]))
    final = load_pretrained(out / "final")
    assert final.config.layer_heads == (3, 3, 3)
    assert sum(final.config.layer_intermediate) == round(0.6 * 3 * 512)
    assert not any("random_ltd" in file.read_text() for file in (out / "final").glob("*.json"))
    hf_dir = export_hf(out / "final", tmp_path / "hf")  # the export runs every token, as eval does
    assert not any("random_ltd" in file.read_text() for file in hf_dir.glob("*.json"))
    hf = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    final.eval()
    ids = torch.randint(5, final.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, final(input_ids=ids).logits, atol=1e-5, rtol=0)
