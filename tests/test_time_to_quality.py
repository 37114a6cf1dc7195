"""The time-to-quality study: its smoke run writes the JSON, the PNG and the table; its interpolation is right.
Timing is never asserted here (benchmarks/time_to_quality.py measures it; docs/benchmarks.md has the figures)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, launcher_env


def study_module():
    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "benchmarks" / "time_to_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_time_to_reach_interpolates_between_evaluations() -> None:
    reach = study_module().time_to_reach
    curve = [{"time_s": 0.0, "val_loss": 9.0}, {"time_s": 10.0, "val_loss": 7.0}, {"time_s": 20.0, "val_loss": 5.0}]
    assert reach(curve, 6.0) == pytest.approx(15.0)
    assert reach(curve, 7.0) == pytest.approx(10.0)
    assert reach(curve, 9.5) == 0.0
    assert reach(curve, 4.9) is None


def test_arms_differ_only_in_their_speed_up() -> None:
    module = study_module()
    args = module.parse_args(["--out", "x", "--steps", "200", "--steps_factor", "pld=1.5"])
    configs = {arm: module.arm_config(arm, args, Path("data"), 128) for arm in module.ARMS}
    common = {key: value for key, value in configs["baseline"].items() if key != "training"}
    for arm, config in configs.items():
        assert {k: v for k, v in config.items() if k in common} == common, arm
    assert "progressive_layer_drop" not in configs["baseline"] and "earlybert" not in configs["baseline"]
    assert configs["pld"]["training"]["max_steps"] == 300
    assert configs["pld"]["progressive_layer_drop"]["gamma"] == pytest.approx(100 / 300)
    assert configs["pld+earlybert"]["earlybert"]["max_search_steps"] == 20


@pytest.mark.slow
def test_smoke_study_writes_json_png_and_table(tmp_path: Path) -> None:
    out = tmp_path / "ttq"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--smoke", "--out",
                           str(out), "--threads", "1"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**launcher_env(), "OMP_NUM_THREADS": "1"})  # not this process's MASTER_PORT
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| arm |"))
    for column in ("final val loss", "wall s", "to baseline final (ratio)", "to within 2% (ratio)"):
        assert column in header
    summary = json.loads((out / "time_to_quality.json").read_text())
    assert (out / "time_to_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arms = summary["arms"]
    assert list(arms) == ["baseline", "pld", "earlybert", "pld+earlybert"]
    assert summary["baseline_final_val_loss"] == arms["baseline"]["curve"][-1]["val_loss"]
    for name, row in arms.items():
        assert row["steps"] == 6 and len(row["curve"]) >= 2 and row["curve"][0]["time_s"] == 0.0, name
        assert all(point["val_loss"] > 0 for point in row["curve"])
    assert arms["baseline"]["time_to_baseline_final_ratio"] == pytest.approx(1.0)
    for name in ("pld", "pld+earlybert"):
        assert arms[name]["mean_layers_run"] < 2, "PLD dropped layers"
    for name in ("earlybert", "pld+earlybert"):
        assert arms[name]["earlybert_drawn_step"] is not None, "the ticket was drawn and the model pruned"
    assert set(summary["goals"]) == {"pld", "earlybert", "pld+earlybert"}
