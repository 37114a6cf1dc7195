"""benchmarks/gpu_suite.sh: its CPU dry run plans every GPU step and runs the CPU-runnable parts for real, and its
guards keep one failing (or no longer fitting) step from losing the others. GPU time comes rarely and briefly, so
a suite that rotted between GPU runs would waste it: these tests are what keeps it runnable."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, launcher_env

SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["setup", "env", "kernel_tests", "lamb_vs_fused", "data", "configs", "train_pld", "train_earlybert",
         "train_resume", "throughput", "profile", "time_to_quality"]


def run_suite(out: Path, *flags: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    env = launcher_env()
    env.pop("OUT", None)
    env["GPU_SUITE_WORK"] = str(out.parent / f"{out.name}-work")
    proc = subprocess.run(["bash", str(SUITE), *flags, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    results_file = out / "results.json"
    assert results_file.exists(), proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc, json.loads(results_file.read_text())


def by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps = {record["name"]: record for record in results["steps"]}
    assert [record["name"] for record in results["steps"]] == STEPS, "every step is recorded once, in order"
    return steps


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("suite") / "dry"
    proc, results = run_suite(out, "--dry-run")
    return proc, results, out


@pytest.mark.slow
def test_dry_run_plans_every_step_and_runs_the_cpu_parts(dry_run) -> None:
    proc, results, out = dry_run
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert results["mode"] == "dry-run" and results["failed_steps"] == []
    steps = by_name(results)
    for name, record in steps.items():
        assert record["status"] in ("ok", "planned", "skipped"), (name, record)
        if record["status"] == "ok":
            assert record["note"].startswith("dry run, CPU stand-in"), record
        else:
            assert record["reason"], f"{name} did not run and gives no reason"
    # What runs on the CPU, runs (these are the parts that would otherwise rot between GPU runs).
    for name in ("env", "kernel_tests", "lamb_vs_fused", "data", "configs", "train_earlybert", "train_resume",
                 "throughput", "profile"):
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["train_pld"]["status"] == "planned" and "train_earlybert" in steps["train_pld"]["reason"]
    # Every GPU step is planned with its real command.
    assert "deepspeed.launcher.runner --num_gpus 1 " in steps["train_pld"]["command"]
    assert "launch/train.py" in steps["train_pld"]["command"] and "--model" not in steps["train_pld"]["command"]
    assert "--stop_at_step" in steps["train_earlybert"]["command"] and "--resume" in steps["train_resume"]["command"]
    assert "--reference fused" in steps["lamb_vs_fused"]["command"]
    assert "gpu_throughput.py --preset bert-base --seq-len 128 --precision bf16" in steps["throughput"]["command"]
    assert "--device cuda" in steps["profile"]["command"] and "bert-base" in steps["profile"]["command"]
    assert "TRITON_INTERPRET" not in steps["kernel_tests"]["command"]
    if (ROOT / "benchmarks" / "time_to_quality.py").exists():
        assert steps["time_to_quality"]["status"] == "planned"
        assert "--device cuda" in steps["time_to_quality"]["command"]
    else:
        assert steps["time_to_quality"]["status"] == "skipped"


@pytest.mark.slow
def test_dry_run_results_hold_the_cpu_figures(dry_run) -> None:
    _, results, out = dry_run
    lamb = results["lamb_vs_fused"]
    assert lamb["reference"] == "torch" and lamb["passed"] and lamb["max_rel_diff"] < 1e-5
    training = results["training"]
    assert all(training[name]["passed"] for name in ("train_earlybert", "train_resume")), training
    assert training["train_earlybert"]["last_step"] == 4 and training.get("train_pld") is None
    assert training["train_earlybert"]["earlybert_drawn_step"] == 2
    resumed = training["train_resume"]
    assert resumed["last_step"] == 6 and resumed["layer_intermediate"] is not None, "resumed the pruned model"
    rows = results["throughput"]["rows"]
    assert len(rows) == 6 and all(float(row["sequences_per_s"]) > 0 for row in rows), rows
    assert results["profile"]["top_ops"] and results["environment"]["torch"] == torch.__version__
    markdown = (out / "results.md").read_text()
    for name in STEPS:
        assert f"| {name} |" in markdown
    assert "## Throughput" in markdown and "## LAMB vs FusedLamb" in markdown and "## Profile" in markdown
    for record in results["steps"]:
        if "log" in record:
            assert (out / record["log"]).is_file(), record


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these steps succeed")
def test_failing_steps_are_recorded_and_the_later_steps_still_run(tmp_path) -> None:
    """A real (non-dry) run on the CPU: the FusedLamb comparison and the throughput benchmark both fail (no CUDA),
    each is recorded with its log's tail, the steps after them still run, and the results are written."""
    proc, results = run_suite(tmp_path / "out", "--only", "env,lamb_vs_fused,throughput")
    assert proc.returncode == 1, proc.stdout[-4000:]
    steps = by_name(results)
    assert steps["env"]["status"] == "ok"
    assert steps["lamb_vs_fused"]["status"] == "failed" and steps["lamb_vs_fused"]["rc"] == 2
    assert "FusedLamb is CUDA-only" in steps["lamb_vs_fused"]["log_tail"]
    assert steps["throughput"]["status"] == "failed" and "no CUDA device" in steps["throughput"]["log_tail"]
    assert results["failed_steps"] == ["lamb_vs_fused", "throughput"]
    for name in set(STEPS) - {"env", "lamb_vs_fused", "throughput"}:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], steps[name]
    assert steps["train_pld"]["reason"].startswith("not selected")
    assert "Failed steps: lamb_vs_fused, throughput." in (tmp_path / "out" / "results.md").read_text()


def test_steps_that_no_longer_fit_the_budget_are_skipped_with_the_reason(tmp_path) -> None:
    """With 30 s left, a step that needs more (after the time kept for throughput and profile) is not started."""
    proc, results = run_suite(tmp_path / "out", "--budget-s", "30", "--only", "kernel_tests,throughput")
    assert proc.returncode == 0, proc.stdout[-4000:]
    steps = by_name(results)
    for name in ("kernel_tests", "throughput"):
        assert steps[name]["status"] == "skipped" and "budget" in steps[name]["reason"], steps[name]
    assert not (tmp_path / "out" / "logs" / "kernel_tests.log").exists(), "a skipped step must not start"
