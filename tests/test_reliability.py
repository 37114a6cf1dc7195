"""Never lose or poison a run (issue 13): divergence, one writer per run folder, signals to the `deepspeed`
launcher, checkpoint integrity and retention, the resume contract, config errors. Real ranks through the launcher
where the behaviour depends on them."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, default_sigint, free_port, tiny_train_config
from test_train import TRAIN, env, train

import ds_pld
from ds_pld.checkpoints import META_FILE, prune_checkpoints, read_checkpoint_meta, resolve_checkpoint
from ds_pld.config_errors import ConfigError
from ds_pld.training.config import LRScheduleConfig
from ds_pld.training.lock import RunFolderBusy, RunFolderLock
from ds_pld.training.metrics import MetricsFile
from ds_pld.training.schedules import lr_multiplier

HANG_GUARD_S = 600  # only against a hang; nothing here asserts on time


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity token fails."""
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def config_with(path: Path, prepared: Path, training: dict | None = None, **top) -> Path:
    config = json.loads(tiny_train_config(path, prepared, training).read_text())
    config.update(top)
    path.write_text(json.dumps(config))
    return path


def single_rank(config: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """One plain `python launch/train.py` rank."""
    return subprocess.run([sys.executable, TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out),
                           *flags], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=HANG_GUARD_S)


def start_launcher(config: Path, out: Path, log: Path, *flags: str) -> subprocess.Popen:
    """The `deepspeed` command with 2 ranks, in its own session (so a test can also signal it like a terminal)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out), *flags]
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=default_sigint)


def wait_for_steps(out: Path, steps: int, launcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert launcher.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)


def long_run_config(path: Path, prepared: Path) -> Path:
    """Far more steps than a test waits for, no periodic checkpoint or validation, no W&B (its service would only
    slow the stop down)."""
    return config_with(path, prepared, {"max_steps": 100000, "checkpoint_every": 100000, "eval_every": 100000},
                       wandb={"enabled": False})


def end_all(procs: list[psutil.Process]) -> None:
    """Clean-up for a failed test: SIGKILL what this test started, by pid."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


@contextlib.contextmanager
def running_job(config: Path, out: Path, log: Path) -> Iterator[tuple[subprocess.Popen, list[psutil.Process]]]:
    """A 2-rank `deepspeed` job that has logged 2 steps: (the launcher, every process under it). Whatever the test
    leaves running is SIGKILLed on the way out."""
    launcher = start_launcher(config, out, log)
    procs: list[psutil.Process] = []
    try:
        wait_for_steps(out, 2, launcher, log)
        procs = psutil.Process(launcher.pid).children(recursive=True)
        yield launcher, procs
    finally:
        end_all(procs)
        if launcher.poll() is None:
            launcher.kill()


# --- 1. divergence --------------------------------------------------------------------------------------------------

def test_metrics_file_is_strict_json(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    metrics.write({"step": 1, "loss": float("nan"), "lr": float("inf"), "nested": {"x": float("-inf")}})
    metrics.close()
    assert strict_records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "lr": None,
                                                            "nested": {"x": None}}]


@pytest.mark.slow
def test_divergence_stops_with_an_error_and_saves_nothing_from_non_finite_weights(prepared, tmp_path):
    """lr 1e3: the loss explodes and turns NaN within a few steps. Before: checkpoints, `latest` and final/ all NaN,
    exit 0, bare NaN in metrics.jsonl."""
    config = config_with(tmp_path / "config.json", prepared, {"checkpoint_every": 2},
                         optimizer={"type": "AdamW", "params": {"lr": 1e3, "weight_decay": 0.01}})
    out = tmp_path / "out"
    proc = train(config, out, check=False)
    assert proc.returncode == 3, proc.stderr[-4000:]
    records = strict_records(out / "metrics.jsonl")
    step = records[-1]["step"]
    assert step < 12 and [r["step"] for r in records] == list(range(1, step + 1))
    assert proc.stderr.count(f"training diverged at step {step}") == 1, "one error line, from rank 0"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    checkpoints = out / "checkpoints"
    saved = sorted(int(p.name.removeprefix("global_step")) for p in checkpoints.glob("global_step*"))
    assert saved and max(saved) < step, f"a checkpoint at or after the divergence: {saved}"
    assert (checkpoints / "latest").read_text() == f"global_step{max(saved)}"
    from ds_pld.models.io import load_pretrained

    for tag in saved:
        weights = load_pretrained(checkpoints / f"global_step{tag}").state_dict()
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), f"non-finite weights in step {tag}"


@pytest.mark.slow
def test_rollback_policy_reloads_the_last_good_checkpoint_skips_batches_and_lowers_the_lr(prepared, tmp_path):
    """`training.on_divergence = "rollback"`: the same lr 1e3 run goes back to its last checkpoint, skips the batches
    it read since, trains on at lr x 1e-6 and finishes; the rollback state travels in the checkpoints. A model blown
    up by lr 1e3 before the checkpoint may diverge once more (how soon depends on the thread count), so a second
    rollback is allowed; each one must compound the factor and the skipped batches."""
    config = config_with(tmp_path / "config.json", prepared,
                         {"checkpoint_every": 2, "on_divergence": "rollback", "rollback_lr_factor": 1e-6,
                          "max_rollbacks": 2},
                         optimizer={"type": "AdamW", "params": {"lr": 1e3, "weight_decay": 0.01}},
                         wandb={"enabled": False})
    out = tmp_path / "out"
    proc = train(config, out)
    found = re.findall(r"training diverged at step (\d+); rolled back to step (\d+) \(rollback (\d) of 2\): skipping "
                       r"the batches of steps (\d+)-(\d+), learning rate x(\S+) of the plan", proc.stdout)
    assert found, proc.stdout[-4000:]
    rollbacks = [(int(d), int(b), float(x)) for d, b, k, first, last, x in found]
    for k, (d, b, k_logged, first, last, x) in enumerate(found, start=1):
        assert int(k_logged) == k and int(b) < int(d) and (int(first), int(last)) == (int(b) + 1, int(d))
        assert math.isclose(float(x), 1e-6 ** k, rel_tol=1e-9)
    records = strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13)) and all(r["loss"] is not None for r in records)
    schedule = LRScheduleConfig.from_dict(json.loads(config.read_text())["lr_schedule"])
    for r in records:
        scale = next((x for _, b, x in reversed(rollbacks) if b < r["step"]), 1.0)
        assert math.isclose(r["lr"], 1e3 * scale * lr_multiplier(r["step"], schedule, 12), rel_tol=1e-9,
                            abs_tol=1e-15), r
    state = torch.load(out / "checkpoints" / "global_step12" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["ds_pld"]["extra"]["divergence"] == {
        "rollbacks": len(rollbacks), "data_offset": sum(d - b for d, b, _ in rollbacks),
        "lr_scale": pytest.approx(1e-6 ** len(rollbacks))}
    from ds_pld.models.io import load_pretrained

    assert all(bool(torch.isfinite(t).all()) for t in load_pretrained(out / "final").state_dict().values())


# --- 2. one writer per run folder -------------------------------------------------------------------------------------

def test_run_folder_lock_refuses_a_second_holder_and_names_it(tmp_path):
    first = RunFolderLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderBusy, match=rf"in use by another run \(host {os.uname().nodename}, pid "
                                            rf"{os.getpid()}, since "):
        RunFolderLock(tmp_path).acquire()  # another open file description conflicts, even in one process
    first.release()
    second = RunFolderLock(tmp_path)
    second.acquire()
    assert second.held
    second.release()


@pytest.mark.slow
def test_second_run_on_one_output_dir_is_refused_and_a_killed_holder_leaves_no_stale_lock(prepared, tmp_path):
    config = long_run_config(tmp_path / "config.json", prepared)
    out, log = tmp_path / "out", tmp_path / "first.log"
    with running_job(config, out, log) as (first, procs):
        rank0 = next(p for p in procs if "--local_rank=0" in p.cmdline())
        second = single_rank(config, out)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("ConfigError: ") and "Traceback" not in second.stderr
        assert f"host {os.uname().nodename}, pid {rank0.pid}" in lines[-1]
        steps = [r["step"] for r in strict_records(out / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)), "the refused run must not touch the first run's metrics"
        end_all([psutil.Process(first.pid), *procs])  # a crash: SIGKILL, no clean-up
        psutil.wait_procs(procs, timeout=HANG_GUARD_S)
        first.wait(timeout=HANG_GUARD_S)
        again = single_rank(config, out, "--max_steps", "1")
        assert again.returncode == 0, f"a killed holder left a stale lock:\n{again.stderr[-3000:]}"


# --- 3. signals to the `deepspeed` command ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to deepspeed", "SIGINT to deepspeed", "Ctrl-C (SIGINT to the group)"])
def test_signal_to_the_deepspeed_command_stops_every_rank_with_a_checkpoint(prepared, tmp_path, how):
    """DeepSpeed 0.19.8's `deepspeed` command forwards no signal on one node: SIGTERM/SIGINT end only that command,
    and the ranks used to train on, orphaned, to max_steps (final/ written, `latest` at the last step)."""
    max_steps = 100000
    config = long_run_config(tmp_path / "config.json", prepared)
    out, log = tmp_path / "out", tmp_path / "run.log"
    with running_job(config, out, log) as (launcher, procs):
        if how.startswith("Ctrl-C"):
            os.killpg(launcher.pid, signal.SIGINT)
        else:
            launcher.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
        launcher.wait(timeout=HANG_GUARD_S)
        gone, alive = psutil.wait_procs(procs, timeout=HANG_GUARD_S)
        assert not alive, f"processes left running: {alive}"
    text = log.read_text()
    steps = [r["step"] for r in strict_records(out / "metrics.jsonl")]
    last = steps[-1]
    assert last < max_steps and steps == list(range(1, last + 1))
    assert text.count(f"stopped at step {last}") == 2, f"every rank stops at the same step:\n{text[-4000:]}"
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"global_step{last}"
    assert read_checkpoint_meta(checkpoints)["global_steps"] == last
    assert not (out / "final").exists()


# --- 4. checkpoint integrity and retention ----------------------------------------------------------------------------

def _tiny_engine():
    import ds_pld
    from ds_pld.models import BertForPreTraining, build_bert_config

    model = BertForPreTraining(build_bert_config("bert-tiny", num_layers=2, vocab_size=64, max_position_embeddings=16))
    engine, *_ = ds_pld.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    return engine


def _save_steps(engine, directory: Path, steps: list[int]) -> None:
    for step in steps:
        engine.global_steps = step
        ds_pld.save_checkpoint(engine, directory)


def test_resume_verifies_sizes_and_falls_back_with_a_message_per_problem(single_rank_world, tmp_path, capsys):
    engine = _tiny_engine()
    _save_steps(engine, tmp_path, [1, 2])
    meta = json.loads((tmp_path / "global_step2" / META_FILE).read_text())
    weights = next(name for name in meta["files"] if name.endswith("model_states.pt"))
    assert meta["files"][weights] == (tmp_path / "global_step2" / weights).stat().st_size
    cases = {  # damage, message, the checkpoint resumed instead
        "truncated": (lambda: (tmp_path / "global_step2" / weights).write_bytes(
            (tmp_path / "global_step2" / weights).read_bytes()[:1000]),
            rf"checkpoint file '{tmp_path / 'global_step2' / weights}' has 1000 bytes, \d+ were written", 1),
        "garbage latest": (lambda: (tmp_path / "latest").write_bytes(b"\xff\xfe\x00junk"),
                           r"/latest' holds garbage \(not UTF-8 text\)", 2),
        "missing folder": (lambda: (tmp_path / "latest").write_text("global_step7"),
                           r"names checkpoint 'global_step7', but the folder .*global_step7' is missing", 2),
        "unfinished": (lambda: (tmp_path / "global_step2" / META_FILE).unlink(),
                       r"global_step2' is incomplete \(no ds_pld_meta.json\): it was not finished", 1),
    }
    for name, (damage, message, fallback) in cases.items():
        shutil.rmtree(tmp_path)
        _save_steps(engine, tmp_path, [1, 2])
        damage()
        found, warning = resolve_checkpoint(tmp_path)
        assert found["tag"] == f"global_step{fallback}", name
        assert warning is not None and re.search(message, warning), (name, warning)
        assert "resuming from the newest intact checkpoint" in warning
        path, _ = ds_pld.load_checkpoint(engine, tmp_path)  # the load falls back the same way, and says so
        assert Path(path).parent.name == f"global_step{fallback}" and "WARNING" in capsys.readouterr().out
        for step in (1, 2):
            if step == fallback or name != "truncated" and name != "unfinished":
                shutil.rmtree(tmp_path / f"global_step{step}")
        with pytest.raises(ConfigError, match=message + ".*no other intact checkpoint"):
            resolve_checkpoint(tmp_path)
    engine.destroy()


def test_keep_checkpoints_removes_only_older_complete_ones(single_rank_world, tmp_path):
    engine = _tiny_engine()
    _save_steps(engine, tmp_path, [1, 2, 3, 4])
    (tmp_path / "global_step1" / META_FILE).unlink()  # an unfinished leftover is not counted and not touched
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["global_step2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step1", "global_step3",
                                                                          "global_step4"]
    assert prune_checkpoints(tmp_path, keep=0) == []
    engine.destroy()


# --- 5. resume contract + 4. integrity with real ranks ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory) -> Path:
    """A finished 12-step 2-rank run that keeps 2 checkpoints (8 and 12)."""
    tmp = tmp_path_factory.mktemp("finished")
    train(config_with(tmp / "config.json", prepared, {"keep_checkpoints": 2}), tmp / "out")
    return tmp


@pytest.mark.slow
def test_keep_checkpoints_in_a_real_run(finished):
    checkpoints = finished / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["global_step12", "global_step8"]


@pytest.mark.slow
def test_resume_at_or_below_the_checkpoint_step_and_on_another_world_size_is_refused(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    final = (out / "final" / "model.safetensors").stat().st_mtime_ns
    done = train(finished / "config.json", out, "--resume", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("ConfigError: ") == 1, "one line, from rank 0"
    assert "max_steps = 12 is at or below the step of checkpoint" in done.stderr
    lower = train(finished / "config.json", out, "--resume", "--max_steps", "10", check=False)
    assert lower.returncode == 2 and "max_steps = 10 is at or below" in lower.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final, "final/ must not be rewritten"
    one = single_rank(finished / "config.json", out, "--resume", "--max_steps", "16")
    assert one.returncode == 2 and "written by 2 rank(s) and this job has 1" in one.stderr, one.stderr[-3000:]
    assert "--allow_world_size_change" in one.stderr and "Traceback" not in one.stderr


@pytest.mark.slow
@pytest.mark.parametrize("replan", [False, True])
def test_truncated_newest_checkpoint_falls_back_and_a_longer_resume_keeps_the_schedule(finished, tmp_path, replan):
    """The newest checkpoint's weights are cut short: the resume warns naming the file, continues from the one
    before, and with a larger --max_steps keeps the original LR schedule (unless --replan_schedule)."""
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    original = {r["step"]: r["lr"] for r in strict_records(out / "metrics.jsonl")}
    weights = out / "checkpoints" / "global_step12" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:4096])
    flags = ["--resume", "--max_steps", "16"] + (["--replan_schedule"] if replan else [])
    proc = train(finished / "config.json", out, *flags)
    assert f"checkpoint file '{weights}' has 4096 bytes" in proc.stdout + proc.stderr
    assert "resuming from the newest intact checkpoint" in proc.stdout + proc.stderr
    records = strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17))
    lrs = {r["step"]: r["lr"] for r in records}
    schedule = json.loads((finished / "config.json").read_text())["lr_schedule"]
    planned = 16 if replan else 12
    for step in range(9, 17):
        expected = 3e-3 * lr_multiplier(step, LRScheduleConfig.from_dict(schedule), planned)
        assert math.isclose(lrs[step], expected, rel_tol=1e-9, abs_tol=1e-12), (step, lrs[step], expected)
    if not replan:
        assert all(lrs[step] == original[step] for step in range(9, 13))
    assert read_checkpoint_meta(out / "checkpoints")["schedule_steps"] == planned


# --- 6. config edges --------------------------------------------------------------------------------------------------

def test_unknown_top_level_key_is_an_error_unless_deepspeed_knows_it(prepared, tmp_path):
    from ds_pld.config import parse_config

    base = json.loads(tiny_train_config(tmp_path / "config.json", prepared).read_text())
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['gradient_clippin'\]"):
        parse_config({**base, "gradient_clippin": 1.0})
    known = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}, "activation_checkpointing": {},
             "flops_profiler": {"enabled": False}, "tensorboard": {"enabled": False}, "wall_clock_breakdown": False,
             "zero_allow_untested_optimizer": True, "communication_data_type": "fp32", "checkpoint": {},
             "data_types": {}, "aio": {}, "elasticity": {"enabled": False}}
    assert parse_config({**base, **known}).deepspeed["zero_optimization"] == {"stage": 1}
