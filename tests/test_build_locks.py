"""A torch extension build lock left by a killed build no longer hangs every later run: it is removed with one line
naming it once it is older than a build can take and no build process is alive; a live build or a young lock is
waited on, and the run says what it waits on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, launcher_env, tiny_train_config

from ds_pld.training.build_locks import check_build_locks, extensions_root, op_folders


def plant_lock(root: Path, op: str, age_s: float) -> Path:
    lock = root / "py3_cpu" / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_lock_is_removed_and_named(tmp_path: Path) -> None:
    lock = plant_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    said: list[str] = []
    assert check_build_locks(tmp_path, stale_after_s=600, say=said.append) == [lock]
    assert not lock.exists()
    assert len(said) == 1 and str(lock) in said[0] and "stale" in said[0]


def test_a_young_lock_is_kept_and_the_wait_is_explained(tmp_path: Path) -> None:
    lock = plant_lock(tmp_path, "fused_adam", age_s=5)
    said: list[str] = []
    assert check_build_locks(tmp_path, stale_after_s=600, say=said.append) == []
    assert lock.exists() and str(lock) in said[0] and "delete that file" in said[0]


def test_an_old_lock_of_a_live_build_is_kept(tmp_path: Path) -> None:
    lock = plant_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    builder = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # a compiler working in the op's folder
    try:
        said: list[str] = []
        assert check_build_locks(tmp_path, stale_after_s=600, say=said.append) == []
        assert lock.exists() and "in progress" in said[0]
    finally:
        builder.kill()
        builder.wait()


def train_two_steps(config: Path, out: Path, extensions: Path | None = None) -> subprocess.CompletedProcess:
    env = launcher_env()
    if extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed_config", str(config),
                           "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_a_run_starts_despite_a_lock_left_by_a_killed_build(tmp_path: Path, prepared: Path) -> None:
    """The lock is planted where a killed build leaves it, in the op's build folder. Without the check torch would
    wait on it for good; here the run trains and says what it removed. The folder is a private copy of this
    machine's build (through $TORCH_EXTENSIONS_DIR): in the shared one, a run of a parallel test would remove the
    planted lock first."""
    config = tiny_train_config(tmp_path / "config.json", prepared, training={"max_steps": 2}, wandb={"enabled": False})
    if not op_folders(extensions_root(), "deepspeed_shm_comm"):
        assert train_two_steps(config, tmp_path / "first").returncode == 0  # builds the op once, as any first run
    private = tmp_path / "extensions"
    built = op_folders(extensions_root(), "deepspeed_shm_comm")[0].parent  # with every other op a run loads
    shutil.copytree(built, private, ignore=shutil.ignore_patterns("lock"))  # times kept: ninja finds no work
    lock = private / "deepspeed_shm_comm" / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    proc = train_two_steps(config, tmp_path / "run", extensions=private)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"removed a stale build lock {lock}" in proc.stdout + proc.stderr
    assert not lock.exists() and (tmp_path / "run" / "final").is_dir()
