"""`mpirun -np 2 python launch/train.py ...`: ranks found through DeepSpeed's MPI discovery (mpi4py), trained end to
end; bad input and a dead rank end the run at once instead of hanging. Uses whatever `mpirun` is on PATH with the
mpi4py it was built for (here: the `mpich` wheel from PyPI); skipped, with the reason, without one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, free_port, launcher_env, tiny_train_config

from ds_pld.checkpoints import read_checkpoint_meta
from ds_pld.training.metrics import read_metrics

pytestmark = pytest.mark.slow

TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 8
TRAINING = {"max_steps": STEPS, "checkpoint_every": 4, "eval_every": 4}


@pytest.fixture(scope="module")
def mpirun() -> str:
    path = shutil.which("mpirun")
    if path is None:
        pytest.skip("no mpirun on PATH (pip install mpich mpi4py gives a matching pair)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (DeepSpeed's MPI discovery needs it)")
    return path


def mpi_env() -> dict[str, str]:
    """A fresh port per run (DeepSpeed's MPI discovery takes $MASTER_PORT), and no SLURM allocation leaking in."""
    env = launcher_env()
    for key in [k for k in env if k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_"))]:
        env.pop(key)
    env.update(MASTER_PORT=str(free_port()), WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def train_command(mpirun: str, config: Path, out: Path) -> list[str]:
    return [mpirun, "-np", "2", sys.executable, TRAIN, "--deepspeed_config", str(config), "--output_dir", str(out)]


def test_mpirun_two_ranks_train_to_the_end(mpirun, prepared, tmp_path):
    out = tmp_path / "out"
    config = tiny_train_config(tmp_path / "c.json", prepared, training=TRAINING)
    proc = subprocess.run(train_command(mpirun, config, out), cwd=ROOT,
                          env=mpi_env(), capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "launcher mpi: world size 2" in output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    meta = read_checkpoint_meta(out / "checkpoints")
    assert meta["world_size"] == 2 and meta["global_steps"] == STEPS, "both ranks must have joined the run"
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert (out / "final").is_dir()


def test_mpirun_world_size_not_dividing_the_batch_fails_fast(mpirun, prepared, tmp_path):
    config = json.loads(tiny_train_config(tmp_path / "c.json", prepared, training=TRAINING).read_text())
    config.pop("train_micro_batch_size_per_gpu")
    config["train_batch_size"] = 9
    (tmp_path / "c.json").write_text(json.dumps(config))
    started = time.monotonic()
    proc = subprocess.run(train_command(mpirun, tmp_path / "c.json", tmp_path / "out"), cwd=ROOT, env=mpi_env(),
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ConfigError" in output and "'train_batch_size' = 9 cannot be split over 2 rank(s)" in output, \
        output[-4000:]
    assert time.monotonic() - started < 240
    assert not (tmp_path / "out" / "checkpoints").exists()


class LongRun:
    """A 2-rank mpirun training that would run for hours, with its rank processes once training has started."""

    def __init__(self, mpirun: str, prepared: Path, tmp_path: Path, **env: str):
        config = tiny_train_config(tmp_path / "c.json", prepared, training={
            "max_steps": 100000, "checkpoint_every": 1000, "eval_every": 1000, "eval_batches": 1})
        out = tmp_path / "out"
        self.log = tmp_path / "log.txt"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(train_command(mpirun, config, out), cwd=ROOT, env={**mpi_env(), **env},
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or not read_metrics(out / "metrics.jsonl"):
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        self.ranks = {p.environ().get("PMI_RANK"): p for p in psutil.Process(self.proc.pid).children(recursive=True)
                      if "launch/train.py" in " ".join(p.cmdline())}
        assert set(self.ranks) == {"0", "1"}, self.ranks

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for rank in self.ranks.values():
            with contextlib.suppress(psutil.Error):
                rank.kill()


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_mpirun_a_dead_rank_ends_the_run(mpirun, prepared, tmp_path):
    """mpirun (hydra) tears the other ranks down when one dies: the survivor does not wait out the collective
    timeout."""
    run = LongRun(mpirun, prepared, tmp_path)
    try:
        killed_at = time.monotonic()
        os.kill(run.ranks["1"].pid, signal.SIGKILL)
        assert run.wait(timeout=120) != 0
        assert time.monotonic() - killed_at < 90
        assert gone(run.ranks["0"]), "rank 0 outlived mpirun"
    finally:
        run.close()


def test_a_hung_rank_is_given_up_after_the_collective_timeout(mpirun, prepared, tmp_path):
    """A rank that stops answering without dying (SIGSTOP here; a wedged GPU or node in real life) is noticed by no
    launcher: the others give up after $DS_PLD_DIST_TIMEOUT_S -- in DeepSpeed's own data-parallel group too, whose
    timeout torch would otherwise take from its 30-minute default -- and exit non-zero."""
    run = LongRun(mpirun, prepared, tmp_path, DS_PLD_DIST_TIMEOUT_S="15")
    try:
        assert "collective timeout 15 s" in run.log.read_text()
        stopped_at = time.monotonic()
        os.kill(run.ranks["1"].pid, signal.SIGSTOP)
        deadline = stopped_at + 150
        while not gone(run.ranks["0"]):
            assert time.monotonic() < deadline, "rank 0 still waits on the hung rank"
            time.sleep(0.5)
        waited = time.monotonic() - stopped_at
        assert 10 < waited < 120, f"gave up after {waited:.0f} s"
        assert "Timed out waiting 15000ms" in run.log.read_text()
        assert run.wait(timeout=120) != 0, "mpirun must end the run once a rank failed"
    finally:
        if not gone(run.ranks["1"]):
            with contextlib.suppress(psutil.Error):
                run.ranks["1"].resume()
        run.close()


@pytest.mark.parametrize("env, kind", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "env"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, "slurm"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "PMI_SIZE": "4"}, "slurm"),  # srun --mpi=pmi2
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "PMI_SIZE": "16"}, "mpi"),  # mpirun in a job
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "single"),  # `python train.py` in the batch script: not a step
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, "mpi"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({}, "single"),
])
def test_launch_kind_reads_the_launchers_environment(monkeypatch, env, kind):
    from ds_pld.training.distributed import MPI_ENV, launch_kind

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", *MPI_ENV, "PMI_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_kind() == kind


def test_collective_timeout_must_be_positive_seconds(monkeypatch):
    from ds_pld.config_errors import ConfigError
    from ds_pld.training.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("0", "-5", "ten", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            collective_timeout()
