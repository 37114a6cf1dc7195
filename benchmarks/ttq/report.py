"""The study's report: per regime a table (mean and standard deviation over seeds), a verdict per arm by the rule in
ttq/stats.py, the sweeps that chose the learning rates and theta_bar, and the curves with a band of one standard
deviation. Works on partial results: what is missing is said, never guessed."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .plan import DATA_LIMITED, DATA_RICH, POST_LN, REGIMES, StudySettings, choices, lr_sweep, regime_runs, theta_sweep
from .stats import below_limit, compare_paired, summarize, time_to_reach

REFERENCE = {DATA_RICH: "baseline", DATA_LIMITED: "baseline", POST_LN: "post-ln baseline"}
GOALS = {"pld": ("best", 0.8), "pld+earlybert": ("best", 0.8), "earlybert": ("within1", 0.7)}


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    s = summarize(values)
    return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}"


def arm_rows(settings: StudySettings, regime: str, results: dict[str, Any], downstream: dict[str, Any]
             ) -> dict[str, dict[int, dict[str, Any]]] | None:
    """arm -> seed -> (result, downstream) of a regime's finished runs; None while its settings are not chosen."""
    runs = regime_runs(settings, regime, choices(settings, results))
    if runs is None:
        return None
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for (arm, seed), run in runs.items():
        rows.setdefault(arm, {})
        if run.key in results:
            rows[arm][seed] = {**results[run.key], "key": run.key, "downstream": downstream.get(run.key)}
    return rows


def _final(row: dict[str, Any], key: str = "val_loss") -> float:
    return math.inf if row.get("diverged_at") is not None else float(row["curve"][-1][key])


def _best_point(row: dict[str, Any]) -> dict[str, float] | None:
    """The evaluation with the lowest validation loss: the quality a run reached (its last one while the curve
    still falls, as in one epoch; earlier when a repeated corpus is overfitted, as early stopping would keep)."""
    if row.get("diverged_at") is not None:
        return None
    return min(row["curve"], key=lambda point: point["val_loss"])


def _best(row: dict[str, Any], key: str = "val_loss") -> float:
    point = _best_point(row)
    return math.inf if point is None else float(point[key])


def _time_to(row: dict[str, Any], target: float) -> float | None:
    return None if row.get("diverged_at") is not None else time_to_reach(row["curve"], target)


def regime_summary(settings: StudySettings, regime: str, results: dict[str, Any], downstream: dict[str, Any]
                   ) -> dict[str, Any] | None:
    rows = arm_rows(settings, regime, results, downstream)
    if rows is None:
        return None
    reference = rows[REFERENCE[regime]]
    ref_best = {seed: _best(row) for seed, row in reference.items()}
    ref_time = {seed: _time_to(row, ref_best[seed]) for seed, row in reference.items()}
    ref_down = {seed: row["downstream"]["accuracy"] for seed, row in reference.items() if row["downstream"]}
    arms: dict[str, Any] = {}
    for arm, seeds in rows.items():
        best = {seed: _best(row) for seed, row in seeds.items()}
        paired = [s for s in seeds if s in reference and ref_time[s]]
        ratio_best = [_ratio(seeds[s], ref_best[s], ref_time[s]) for s in paired]
        ratio_within1 = [_ratio(seeds[s], 1.01 * ref_best[s], ref_time[s]) for s in paired]
        down = {seed: row["downstream"]["accuracy"] for seed, row in seeds.items() if row["downstream"]}
        entry: dict[str, Any] = {
            "seeds": sorted(seeds), "keys": {s: row["key"] for s, row in seeds.items()},
            "best_val_loss": list(best.values()),
            "best_val_accuracy": [_best(row, "val_accuracy") for row in seeds.values()],
            "final_val_loss": [_final(row) for row in seeds.values()],
            "train_time_s": [row["train_time_s"] for row in seeds.values()],
            "steps": [row["steps"] for row in seeds.values()],
            "mean_layers_run": [row["mean_layers_run"] for row in seeds.values()],
            "epochs": [row["epochs"] for row in seeds.values()],
            "ratio_to_reference_best": ratio_best, "ratio_to_within_1pct": ratio_within1,
            "downstream_accuracy": list(down.values()),
        }
        if regime == DATA_LIMITED:
            entry["final_train_loss"] = [_final(row, "train_loss") for row in seeds.values()]
        if arm != REFERENCE[regime] and paired:
            entry["loss_vs_reference"] = compare_paired(best, ref_best).to_dict()
            if down and ref_down and set(down) & set(ref_down):
                entry["downstream_vs_reference"] = compare_paired(down, ref_down, lower_is_better=False).to_dict()
            entry["verdict"] = verdict(entry)
        arms[arm] = entry
    return {"reference": REFERENCE[regime], "arms": arms, "goals": goals(arms) if regime != POST_LN else {}}


def _ratio(row: dict[str, Any], target: float, reference_time: float) -> float | None:
    """Time the run needs to reach `target`, over the time the reference needed (None: never reached)."""
    reach = _time_to(row, target)
    return None if reach is None else reach / reference_time


def verdict(entry: dict[str, Any]) -> str:
    """One sentence by the 2-standard-error rule: time to the reference's best loss first, then the best loss at
    equal budget."""
    ratios = entry["ratio_to_reference_best"]
    if below_limit(ratios, 1.0):
        s = summarize(ratios)
        return f"wins: reaches the reference's best validation loss in {s.mean:.2f}x ± {s.se:.2f} (s.e.) of its time"
    loss = entry["loss_vs_reference"]
    diff = loss["diff"]
    if loss["verdict"] == "better":
        return f"wins by {-diff['mean']:.3f} nats of best validation loss at equal budget (± {diff['se']:.3f} s.e.)"
    if loss["verdict"] == "worse":
        return f"loses by {diff['mean']:.3f} nats of best validation loss at equal budget (± {diff['se']:.3f} s.e.)"
    reached = sum(r is not None for r in ratios)
    return (f"no difference (best loss {diff['mean']:+.3f} ± {diff['se']:.3f} s.e.; reached the reference's "
            f"best loss in {reached} of {len(ratios)} seeds)")


def goals(arms: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals: time ratio below the limit beyond 2 s.e., downstream accuracy at most 1 point below the
    baseline's (mean of the paired differences)."""
    out = {}
    for arm, (target, limit) in GOALS.items():
        if arm not in arms:
            continue
        entry = arms[arm]
        ratios = entry["ratio_to_reference_best" if target == "best" else "ratio_to_within_1pct"]
        down = entry.get("downstream_vs_reference")
        within = None if down is None else down["diff"]["mean"] * 100 >= -1.0  # at most 1 point below
        out[arm] = {"target": "reference best val loss" if target == "best" else "within 1% of it",
                    "max_ratio": limit, "ratios": ratios, "time_met": below_limit(ratios, limit),
                    "downstream_within_1pt": within,
                    "met": below_limit(ratios, limit) and bool(within)}
    return out


def sweeps(settings: StudySettings, results: dict[str, Any]) -> dict[str, Any]:
    picked = choices(settings, results)

    def row(run) -> dict[str, Any] | None:
        result = results.get(run.key)
        if result is None:
            return None
        return {"best_val_loss": _best(result), "best_val_accuracy": _best(result, "val_accuracy"),
                "final_val_loss": _final(result),
                "steps": result["steps"], "diverged_at": result.get("diverged_at"),
                "mean_layers_run": result["mean_layers_run"]}

    out: dict[str, Any] = {"chosen": {"pre_lr": picked.pre_lr, "post_lr": picked.post_lr, "theta": picked.theta}}
    for norm in ("pre", "post"):
        out[f"lr_{norm}"] = {str(lr): row(run) for lr, run in lr_sweep(settings, norm).items()}
    if picked.pre_lr is not None:
        out["theta"] = {str(t): row(run) for t, run in theta_sweep(settings, picked.pre_lr).items()}
    return out


def build_report(settings: StudySettings, results: dict[str, Any], downstream: dict[str, Any],
                 calibration: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {"calibration": calibration, "downstream_reference": reference,
                              "sweeps": sweeps(settings, results),
                              "regimes": {r: regime_summary(settings, r, results, downstream) for r in REGIMES}}
    rich = report["regimes"][DATA_RICH]
    if calibration and rich and rich["arms"]["baseline"]["best_val_accuracy"]:
        accuracy = summarize(rich["arms"]["baseline"]["best_val_accuracy"]).mean
        report["past_plateau"] = {"plateau_accuracy": calibration["plateau_accuracy"],
                                  "baseline_accuracy": accuracy,
                                  "times_plateau": accuracy / calibration["plateau_accuracy"]}
    return report


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    calibration = report["calibration"] or {}
    if "past_plateau" in report:
        p = report["past_plateau"]
        lines.append(f"Plateau accuracy (share of the most frequent target token, {calibration.get('plateau_token')!r}"
                     f"): {p['plateau_accuracy']:.4f}; data-rich baseline: {p['baseline_accuracy']:.4f} "
                     f"({p['times_plateau']:.2f}x).\n")
    sweep = report["sweeps"]
    lines += ["| learning rate | pre-LN best val loss | post-LN best val loss |", "| ---: | ---: | ---: |"]
    for lr in sweep["lr_pre"]:
        cells = [_sweep_cell(sweep[f"lr_{n}"].get(lr)) for n in ("pre", "post")]
        lines.append(f"| {lr} | {cells[0]} | {cells[1]} |")
    lines.append(f"\nChosen: pre-LN lr {sweep['chosen']['pre_lr']}, post-LN lr {sweep['chosen']['post_lr']}, "
                 f"theta_bar {sweep['chosen']['theta']}.\n")
    if "theta" in sweep:
        lines += ["| theta_bar | best val loss | val acc | steps | layers run |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for theta, row in sweep["theta"].items():
            lines.append(f"| {theta} | " + (" | ".join([f"{row['best_val_loss']:.4f}",
                                                         f"{row['best_val_accuracy']:.4f}", str(row["steps"]),
                                                         f"{row['mean_layers_run']:.2f}"]) if row else "- | - | - | -")
                         + " |")
    for regime, summary in report["regimes"].items():
        lines.append(f"\n### {regime}\n")
        if summary is None:
            lines.append("Not started: its settings depend on sweeps still running.")
            continue
        limited = regime == DATA_LIMITED
        head = ["arm", "seeds", "steps", "best val loss", "val acc"] + (["final train loss", "epochs"] if limited
                                                                          else [])
        head += ["time to ref. best (ratio)", "downstream acc", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for arm, entry in summary["arms"].items():
            reached = [r for r in entry["ratio_to_reference_best"] if r is not None]
            ratio = (f"{_fmt(reached, 3)} ({len(reached)}/{len(entry['ratio_to_reference_best'])} reached)"
                     if entry["ratio_to_reference_best"] else "-")
            cells = [arm, str(len(entry["seeds"])), _fmt(entry["steps"], 0), _fmt(entry["best_val_loss"]),
                     _fmt(entry["best_val_accuracy"])]
            if limited:
                cells += [_fmt(entry["final_train_loss"]), _fmt(entry["epochs"], 1)]
            cells += [ratio, _fmt([100 * a for a in entry["downstream_accuracy"]], 1),
                      entry.get("verdict", "reference" if arm == summary["reference"] else "pending")]
            lines.append("| " + " | ".join(cells) + " |")
    reference = report.get("downstream_reference")
    if reference:
        lines.append(f"\nDownstream references (dev accuracy): majority class "
                     f"{100 * reference['majority_accuracy']:.1f}, bag-of-words logistic regression "
                     f"{100 * reference['bag_of_words_accuracy']:.1f}.")
    return "\n".join(lines) + "\n"


def _sweep_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["diverged_at"] is not None:
        return f"diverged at step {row['diverged_at']}"
    return f"{row['best_val_loss']:.4f} (acc {row['best_val_accuracy']:.4f})"


def plot(settings: StudySettings, report: dict[str, Any], results: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per regime: validation loss (and, data-limited, training loss) against training time, mean over
    seeds with a band of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import band

    written = []
    for regime, summary in report["regimes"].items():
        if summary is None:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        lows = []
        for arm, entry in summary["arms"].items():
            curves = [results[key]["curve"] for key in entry["keys"].values()
                      if results[key].get("diverged_at") is None]
            if not curves:
                continue
            end = max(c[-1]["time_s"] for c in curves)
            grid = [end * i / 60 for i in range(61)]
            keys = ["val_loss"] + (["train_loss"] if regime == DATA_LIMITED else [])
            for key in keys:
                mean, sd = band(curves, grid, key)
                style = "-" if key == "val_loss" else "--"
                line, = ax.plot(grid, mean, style, label=f"{arm} ({key.split('_')[0]}, n={len(curves)})")
                ax.fill_between(grid, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                color=line.get_color(), alpha=0.2)
                lows.append(min(mean))
        if lows:
            ax.set_ylim(min(lows) - 0.2, min(lows) + 2.5)
        ax.set_xlabel("training time (s on the arm's clock, evaluation excluded)")
        ax.set_ylabel("MLM loss")
        ax.set_title(f"time to quality, {regime} (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
        if lows:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"ttq_{regime}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
