"""The time-to-quality study: its budget planner, seed aggregation and significance rule on constructed inputs whose
answers are known, its plan's order and sharing, and the smoke study end to end (outputs and resume; timing is
never asserted: benchmarks/time_to_quality.py measures it and docs/benchmarks.md has the figures)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, launcher_env

sys.path.insert(0, str(ROOT / "benchmarks"))
from ttq import budget, plan, report, stats  # noqa: E402

SETTINGS = plan.StudySettings(budget_s=100.0, layers=8, hidden=128, heads=2, batch=32, lr_grid=(1e-3, 2e-3, 4e-3),
                              thetas=(0.5, 0.75, 0.9), seeds=(0, 1, 2))


def test_budget_schedules_follow_the_share_spent() -> None:
    b = budget.Budget(100.0, warmup=0.1, gamma=100.0)
    assert b.lr_multiplier(0.0) == pytest.approx(1e-3)  # a sliver, not 0
    assert b.lr_multiplier(5.0) == pytest.approx(0.5)
    assert b.lr_multiplier(10.0) == pytest.approx(1.0)
    assert b.lr_multiplier(55.0) == pytest.approx(0.5)
    assert b.lr_multiplier(100.0) == 0.0 and b.lr_multiplier(150.0) == 0.0
    assert b.theta(0.0, 0.5) == pytest.approx(1.0)
    assert abs(b.theta(5.0, 0.5) - 0.5) < 0.01 * 0.5  # within 1% of theta_bar after 5% of the budget
    assert b.theta(3.0, 0.5) > b.theta(4.0, 0.5) > 0.5
    assert not b.spent(99.9) and b.spent(100.0)
    assert budget.plan_steps(b, 0.5) == 200 and budget.plan_steps(b, 0.5, fraction=0.1) == 20
    with pytest.raises(ValueError):
        budget.Budget(0.0)


def test_cpu_clock_ignores_waiting_and_wall_clock_counts_it() -> None:
    """Why the CPU study clocks arms by CPU time: time spent off the CPU (another job's turn) is not the arm's."""
    cpu, wall = budget.Clock("cpu"), budget.Clock("wall")
    cpu.start()
    wall.start()
    time.sleep(0.3)
    assert cpu.stop() < 0.1
    assert wall.stop() >= 0.3
    with pytest.raises(RuntimeError):
        cpu.stop()


def test_paired_comparison_and_the_two_standard_error_rule() -> None:
    reference = {0: 5.00, 1: 5.10, 2: 4.90}
    assert stats.compare_paired({0: 4.90, 1: 5.01, 2: 4.79}, reference).verdict == "better"  # -0.10 +- 0.005
    assert stats.compare_paired({0: 5.10, 1: 5.19, 2: 5.01}, reference).verdict == "worse"
    noisy = stats.compare_paired({0: 4.80, 1: 5.25, 2: 4.88}, reference)  # mean -0.023, se 0.059
    assert noisy.verdict == "no difference" and noisy.diff.mean == pytest.approx(-0.0233, abs=1e-3)
    two_seeds = stats.compare_paired({0: 4.0, 1: 4.1}, reference)
    assert two_seeds.verdict == "no difference"  # fewer than 3 seeds is never a verdict
    assert stats.compare_paired({0: 0.80, 1: 0.81, 2: 0.79}, {0: 0.70, 1: 0.70, 2: 0.70},
                                lower_is_better=False).verdict == "better"
    s = stats.summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.sd, s.se) == (2.0, 1.0, pytest.approx(1 / math.sqrt(3)))
    assert stats.below_limit([0.70, 0.72, 0.71], 0.8) and not stats.below_limit([0.6, 0.9, 0.75], 0.8)
    assert not stats.below_limit([0.5, 0.5, None], 0.8) and not stats.below_limit([0.5, 0.5], 0.8)


def test_time_to_reach_and_bands_interpolate_linearly() -> None:
    curve = [{"time_s": 0.0, "val_loss": 9.0}, {"time_s": 10.0, "val_loss": 7.0}, {"time_s": 20.0, "val_loss": 5.0}]
    assert stats.time_to_reach(curve, 6.0) == pytest.approx(15.0)
    assert stats.time_to_reach(curve, 7.0) == pytest.approx(10.0)
    assert stats.time_to_reach(curve, 9.5) == 0.0
    assert stats.time_to_reach(curve, 4.9) is None
    other = [{"time_s": 0.0, "val_loss": 7.0}, {"time_s": 20.0, "val_loss": 3.0}]
    mean, sd = stats.band([curve, other], [0.0, 5.0, 20.0, 30.0])
    assert mean == pytest.approx([8.0, 7.0, 4.0, 4.0])
    assert sd[0] == pytest.approx(math.sqrt(2))


def _result(final: float, time_s: float = 100.0, speed: float = 1.0, **extra) -> dict:
    """A finished run whose loss falls linearly from 9 to `final` over its budget; `speed` < 1 gets there sooner."""
    curve = [{"time_s": t * time_s / 10, "step": t, "val_loss": 9.0 - (9.0 - final) * min(1.0, t / 10 / speed),
              "val_accuracy": 0.1} for t in range(11)]
    return {"curve": curve, "train_time_s": time_s, "steps": 100, "mean_layers_run": 8.0, "epochs": 1,
            "diverged_at": None, **extra}


def test_plan_orders_the_sweeps_first_and_shares_identical_runs() -> None:
    groups = plan.ready_groups(SETTINGS, {})
    assert [g.name for g in groups] == ["lr sweep pre-LN", "lr sweep post-LN"]
    results = {run.key: _result(5.0 + abs(lr - 2e-3) * 100) for lr, run in plan.lr_sweep(SETTINGS, "pre").items()}
    picked = plan.choices(SETTINGS, results)
    assert picked.pre_lr == 2e-3 and picked.theta is None and picked.post_lr is None
    groups = {g.name: g for g in plan.ready_groups(SETTINGS, results)}
    assert list(groups)[:3] == ["lr sweep post-LN", "theta sweep, data-rich seed 0", "data-rich seed 0"]
    # While theta_bar is unknown the arms without PLD go ahead; baseline seed 0 is the sweep's run at 2e-3.
    assert [r.arm for r in groups["data-rich seed 0"].runs] == ["earlybert", "random-ltd"]
    assert [r.arm for r in groups["data-limited seed 2"].runs] == ["baseline", "earlybert"]
    assert not any(name.startswith("post-ln") for name in groups)  # waits for the post-LN sweep
    results.update({run.key: _result(5.5 - 0.1 * (theta == 0.75))
                    for theta, run in plan.theta_sweep(SETTINGS, 2e-3).items()})
    assert plan.choices(SETTINGS, results).theta == 0.75
    groups = {g.name: g for g in plan.ready_groups(SETTINGS, results)}
    # PLD at the chosen theta, seed 0, is the sweep's run: not trained again
    assert [r.arm for r in groups["data-rich seed 0"].runs] == ["earlybert", "pld+earlybert", "random-ltd",
                                                                "pld+random-ltd", "pld+earlybert+random-ltd"]
    assert [(r.arm, r.theta) for r in groups["data-rich seed 1"].runs if r.uses_pld] == [
        ("pld", 0.75), ("pld+earlybert", 0.75), ("pld+random-ltd", 0.75), ("pld+earlybert+random-ltd", 0.75)]
    assert [r.arm for r in groups["data-rich seed 1"].runs if r.uses_random_ltd] == list(plan.LTD_ARMS)
    limited = groups["data-limited seed 1"].runs
    assert len(limited) == 4 and all(r.train_sequences == SETTINGS.limited_sequences and r.dropout == 0.1
                                     for r in limited)
    results.update({run.key: _result(6.0 - lr * 100) for lr, run in plan.lr_sweep(SETTINGS, "post").items()})
    post1 = {g.name: g for g in plan.ready_groups(SETTINGS, results)}["post-ln seed 1"].runs
    assert [(r.arm, r.layer_norm, r.lr) for r in post1] == [("baseline", "post", 4e-3)]  # pre-LN ones are data-rich's


def test_the_study_counts_shared_runs_once() -> None:
    # sweeps 3 + 3 + 3; data-rich 7 arms x 3 seeds (the 4 arms and the 3 random-LTD ones) less baseline and PLD of
    # seed 0 (the sweeps' runs); data-limited 4 arms x 3; post-LN: the post-LN baseline at seeds 1 and 2 (seed 0 is
    # its sweep's run; the pre-LN arms are data-rich's)
    assert plan.count_runs(SETTINGS) == 9 + 19 + 12 + 2


def test_a_diverged_run_never_wins_a_sweep() -> None:
    sweep = plan.lr_sweep(SETTINGS, "post")
    results = {run.key: _result(5.0) for run in sweep.values()}
    results[sweep[4e-3].key] = _result(1.0, diverged_at=17)
    results[sweep[1e-3].key] = _result(4.0)
    assert plan.best(sweep, results) == 1e-3


def _regime_results(arm_final: dict[str, float], speed: dict[str, float]) -> dict:
    picked = plan.Choices(pre_lr=2e-3, post_lr=1e-3, theta=0.5)
    runs = plan.regime_runs(SETTINGS, plan.DATA_RICH, picked)
    results = {}
    for (arm, seed), run in runs.items():
        results[run.key] = _result(arm_final[arm] + 0.01 * seed, speed=speed.get(arm, 1.0))
    for (lr, run) in plan.lr_sweep(SETTINGS, "pre").items():
        results.setdefault(run.key, _result(5.0 if lr == 2e-3 else 6.0))
    for (theta, run) in plan.theta_sweep(SETTINGS, 2e-3).items():
        results.setdefault(run.key, _result(5.0 if theta == 0.5 else 6.0))
    return results


def test_report_verdicts_on_constructed_regimes() -> None:
    finals = {"baseline": 5.0, "pld": 5.0, "earlybert": 5.2, "pld+earlybert": 4.9, "random-ltd": 5.0,
              "pld+random-ltd": 5.0, "pld+earlybert+random-ltd": 5.1}
    results = _regime_results(finals, speed={"pld": 0.7})  # PLD gets to the same loss at 0.7 of the time
    summary = report.regime_summary(SETTINGS, plan.DATA_RICH, results, {})
    arms = summary["arms"]
    assert arms["pld"]["ratio_to_reference_best"] == pytest.approx([0.7, 0.7, 0.7])
    assert arms["pld"]["verdict"].startswith("wins: reaches the reference's best validation loss in 0.70x")
    assert arms["earlybert"]["verdict"].startswith("loses by 0.200")
    assert arms["pld+earlybert"]["verdict"].startswith("wins")
    assert summary["goals"]["pld"]["time_met"] and not summary["goals"]["earlybert"]["time_met"]
    assert summary["goals"]["pld"]["downstream_within_1pt"] is None  # nothing fine-tuned: not claimed
    assert not summary["goals"]["pld"]["met"]
    picked = plan.Choices(pre_lr=2e-3, post_lr=1e-3, theta=0.5)
    accuracy = {"baseline": 0.80, "pld": 0.83, "earlybert": 0.77, "pld+earlybert": 0.795, "random-ltd": 0.80,
                "pld+random-ltd": 0.80, "pld+earlybert+random-ltd": 0.80}
    downstream = {run.key: {"accuracy": accuracy[arm] + 0.001 * seed}
                  for (arm, seed), run in plan.regime_runs(SETTINGS, plan.DATA_RICH, picked).items()}
    scored = report.regime_summary(SETTINGS, plan.DATA_RICH, results, downstream)
    assert scored["arms"]["pld"]["downstream_vs_reference"]["verdict"] == "better"
    assert scored["goals"]["pld"]["downstream_within_1pt"]  # 3 points better is "within 1 point" of not worse
    assert scored["goals"]["pld"]["met"]  # in 0.7x of the time, and not worse downstream
    goal = scored["goals"]["pld+earlybert"]  # 0.5 points below is within 1 point, but 0.98x of the time is not 0.8x
    assert goal["downstream_within_1pt"] and not goal["time_met"] and not goal["met"]
    assert not scored["goals"]["earlybert"]["downstream_within_1pt"]  # 3 points below
    same = report.regime_summary(SETTINGS, plan.DATA_RICH, _regime_results(
        dict.fromkeys(finals, 5.0), speed={}), {})
    assert same["arms"]["pld"]["verdict"].startswith("no difference")


def test_run_keys_ignore_the_regime_and_see_every_setting() -> None:
    a = plan.spec(SETTINGS, "pld", 0, 2e-3, theta=0.5)
    assert a.key == plan.spec(SETTINGS, "pld", 0, 2e-3, theta=0.5).key
    for change in ({"seed": 1}, {"lr": 1e-3}, {"theta": 0.75}, {"train_sequences": 64}, {"layer_norm": "post"}):
        assert replace(a, **change).key != a.key, change


@pytest.mark.slow
def test_smoke_study_runs_every_regime_and_resumes(tmp_path: Path, synthetic_wordnet: Path) -> None:
    out = tmp_path / "ttq"
    command = [sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--smoke", "--out", str(out),
               "--wordnet", str(synthetic_wordnet), "--publish", str(tmp_path / "figures")]
    env = {**launcher_env(), "OMP_NUM_THREADS": "1"}  # not this process's MASTER_PORT
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert study["calibration"]["plateau_accuracy"] > 0
    chosen = study["sweeps"]["chosen"]
    assert chosen["pre_lr"] == chosen["post_lr"] == 2e-3 and chosen["theta"] in (0.5, 0.9)
    for regime in plan.REGIMES:
        arms = study["regimes"][regime]["arms"]
        for arm, entry in arms.items():
            assert entry["seeds"] == [0, 1], (regime, arm)
            assert all(math.isfinite(v) for v in entry["best_val_loss"]), (regime, arm)
    rich = study["regimes"][plan.DATA_RICH]["arms"]
    assert all(len(entry["downstream_accuracy"]) == 2 for entry in rich.values())
    assert all(entry.get("verdict", "").startswith("no difference") for arm, entry in rich.items() if arm != "baseline")
    assert 0.0 <= rich["baseline"]["downstream_accuracy"][0] <= 1.0
    assert set(rich) == {*plan.ARMS, "pld+earlybert+random-ltd"}
    ltd = [r for r in study["results"].values() if r["spec"]["arm"] == "pld+earlybert+random-ltd"]
    assert len(ltd) == 2 and all(r["mean_ltd_tokens"] < 32 for r in ltd), "random-LTD keeps fewer tokens at first"
    assert max(rich["pld"]["mean_layers_run"]) < 3 and all(s is not None for s in [
        r["earlybert_drawn_step"] for r in study["results"].values() if "earlybert" in r["spec"]["arm"]])
    limited = study["regimes"][plan.DATA_LIMITED]["arms"]["baseline"]
    assert all(math.isfinite(v) for v in limited["final_train_loss"])
    for name in ("ttq_data-rich.png", "ttq_data-limited.png", "ttq_post-ln.png", "ttq_study.md", "ttq_study.json",
                 "ttq_study/calibration.json", "ttq_study/settings.json", "ttq_study/downstream_task/reference.json"):
        assert (tmp_path / "figures" / name).is_file(), name
    assert "verdict" in (out / "study.md").read_text()
    reference = study["downstream_reference"]
    assert 0.0 <= reference["majority_accuracy"] <= reference["bag_of_words_accuracy"] <= 1.0
    # A rerun finds every unit finished: it starts no worker and rewrites the same report.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0 and "[ttq] start" not in again.stdout, again.stdout[-2000:]
