"""A non-editable install works: the wheel holds every package under ds_pld/ (and the packaged GLUE config), and
its console commands prepare data and train from outside the checkout, in a fresh virtual environment that reuses
this machine's installed dependencies (no network)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, launcher_env, tiny_train_config


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_its_commands_train_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in launcher_env().items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(ROOT)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("ds_pld-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "ds_pld").rglob("*.py"))
    missing = sorted({f"{package}/__init__.py" for package in packages} - names)
    assert not missing, f"packages the wheel leaves out: {missing}"
    assert "ds_pld/configs/glue.json" in names and "ds_pld/training/pretrain.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    commands = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("ds-pld-train", "ds-pld-finetune", "ds-pld-export", "ds-pld-prepare"):
        assert f"{command} =" in commands, command

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bin_dir = venv / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)
    work = tmp_path / "elsewhere"  # not the checkout: nothing can come from ROOT
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import ds_pld.cli.train, ds_pld; print(ds_pld.__file__)"],
                 work, env).stdout.strip().splitlines()[-1]
    assert where.startswith(str(venv)), f"ds_pld was imported from {where}, not from the installed wheel"
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "WANDB_MODE": "disabled"}
    _run(["ds-pld-prepare", "--output_dir", "data", "--vocab_size", "1024", "--max_seq_length", "32",
          "--num_proc", "1"], work, env)
    config = tiny_train_config(work / "config.json", work / "data", training={"max_steps": 3})
    _run(["ds-pld-train", "--deepspeed_config", str(config), "--output_dir", "run"], work, env)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and (work / "run" / "final").is_dir()
