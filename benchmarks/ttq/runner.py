"""Running the study: the calibration, the groups of interleaved runs and the fine-tunings, each in a worker process
of its own, as many at once as `--workers` (one per core on the CPU, each with one torch thread), in the order the
plan allows. Every unit writes its result file when it finishes (ttq/store.py), so the study can be stopped and
rerun at any time."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .arm import Arm, earlybert_search_steps, run_config
from .budget import Budget
from .plan import DATA_RICH, Group, RunSpec, StudySettings, choices, ready_groups, regime_runs
from .store import (
    CALIBRATION,
    DOWNSTREAM,
    RESULTS,
    RUNNING,
    mark_running,
    read_folder,
    read_json,
    running_units,
    write_atomic,
)

CALIBRATION_STEPS = (2, 8)  # warm-up steps, timed steps
CHUNK = 5  # steps an arm runs before the next arm's turn


def _setup(device: str, threads: int | None) -> None:
    os.environ.setdefault("DS_ACCELERATOR", device)
    os.environ["WANDB_MODE"] = "disabled"
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ds_pld.training.distributed import init_distributed

    init_distributed()


def _build(spec: RunSpec, settings: StudySettings, data: Path, seq: int, out: Path, search_steps: int,
           eval_batches: int, bf16: bool) -> Any:
    from ds_pld.training.config import parse_run_config
    from ds_pld.training.run import build_run

    folder = out / "runs" / spec.key
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished run starts over
    config = parse_run_config(run_config(spec, settings, data, seq, search_steps, eval_batches, bf16))
    return build_run(config, folder, resume=False)


def calibrate(settings: StudySettings, data: Path, out: Path, args: Any) -> dict[str, Any]:
    """The full model's step time (for EarlyBERT's search length) and the plateau accuracy: the share of the most
    frequent target token among the masked positions of the validation slice every evaluation scores."""
    import torch

    from ds_pld.training.evaluate import VALIDATION_STREAM
    from ds_pld.training.inputs import derived_seed, masked_batch
    from ds_pld.training.step import train_step

    from .arm import EVAL_SEED
    from .budget import Clock

    spec = RunSpec(arm="baseline", seed=settings.seeds[0], lr=settings.lr_grid[0], budget_s=settings.budget_s)
    from ds_pld.data import load_pretraining_data

    seq = load_pretraining_data(data).max_seq_length
    run = _build(spec, settings, data, seq, out / "calibration", 2, args.eval_batches, args.bf16)
    counts: Counter[int] = Counter()
    for index in range(args.eval_batches):
        start = index * run.micro_batch
        rows = torch.stack([run.data.validation[(start + i) % len(run.data.validation)]["input_ids"]
                            for i in range(run.micro_batch)])
        batch = masked_batch(run.masker, rows.long(), derived_seed(EVAL_SEED, VALIDATION_STREAM, index, 0),
                             run.engine.device)
        counts.update(batch["labels"][batch["labels"] != -100].tolist())
    token, top = counts.most_common(1)[0]
    clock = Clock(args.clock, args.device)
    warm, timed = CALIBRATION_STEPS
    for step in range(warm + timed):
        if step == warm:
            clock.start()
        train_step(run)
    step_s = clock.stop() / timed
    shutil.rmtree(out / "calibration", ignore_errors=True)
    return {"step_s": step_s, "clock": args.clock, "plateau_accuracy": top / sum(counts.values()),
            "plateau_token": run.data.tokenizer.convert_ids_to_tokens(token), "masked_positions": sum(counts.values()),
            "train_sequences": len(run.data.train), "seq": run.data.max_seq_length,
            "train_tokens": len(run.data.train) * run.data.max_seq_length}


def run_group(group: Group, settings: StudySettings, data: Path, out: Path, args: Any) -> None:
    """Train the group's runs interleaved, CHUNK steps at a time; write each one's result when its budget is spent."""
    from ds_pld.algorithms import Event, run_event

    calibration = read_json(out / CALIBRATION)
    search = earlybert_search_steps(settings, calibration["step_s"])
    arms = []
    markers = {spec.key: mark_running(out, spec.key) for spec in group.runs}
    for spec in group.runs:
        run = _build(spec, settings, data, calibration["seq"], out, search, args.eval_batches, args.bf16)
        limited = spec.train_sequences is not None
        train_slice = run.data.train.select(range(min(len(run.data.train), args.eval_batches * run.micro_batch)))
        arm = Arm(spec, run, Budget(spec.budget_s, settings.warmup, settings.gamma_budget), args.clock,
                  args.device, train_slice if limited else None, settings)
        arm.evaluate()
        arms.append(arm)
    pending = list(arms)
    while pending:
        for arm in list(pending):
            arm.train(CHUNK)
            if arm.done:
                pending.remove(arm)
                if arm.diverged_at is None:
                    run_event(arm.run.callbacks, Event.FIT_END, arm.run.state)  # final/, as launch/train.py ends
                    final = arm.run.checkpointing.final_dir
                else:
                    arm.run.metrics_log.close()
                    arm.run.checkpointing.release()
                    final = None
                write_atomic(out / RESULTS / f"{arm.spec.key}.json",
                             {"spec": asdict(arm.spec), "final_dir": None if final is None else str(final),
                              "earlybert_search_steps": search if arm.spec.uses_earlybert else None,
                              **arm.result()})
                markers[arm.spec.key].unlink(missing_ok=True)
                print(f"[ttq] {group.name}: {arm.spec.key} done: {arm.run.step} steps, "
                      f"val loss {arm.curve[-1]['val_loss']:.4f}", flush=True)


def downstream_runs(settings: StudySettings, results: dict[str, Any]) -> list[RunSpec]:
    """The data-rich regime's finished, non-diverged runs, whose final models are fine-tuned."""
    runs = regime_runs(settings, DATA_RICH, choices(settings, results)) or {}
    return [run for run in runs.values() if run.key in results and results[run.key].get("final_dir")]


def worker_command(units: list[dict[str, Any]], args: Any) -> list[str]:
    script = Path(__file__).resolve().parents[1] / "time_to_quality.py"
    return [sys.executable, str(script), *args.forwarded, "--out", args.out, "--worker", json.dumps(units)]


def study(settings: StudySettings, out: Path, args: Any) -> None:
    """Run every unit not yet finished, `args.workers` at a time, until the plan has nothing left."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    if read_json(out / CALIBRATION) is None:
        subprocess.run(worker_command([{"kind": "calibrate", "name": "calibration"}], args), check=True, env=env)
    running: dict[subprocess.Popen, tuple[str, set[str]]] = {}
    while True:
        results = read_folder(out / RESULTS)
        finetuned = read_folder(out / DOWNSTREAM)
        for unit in running_units(out):  # a finished unit's marker (its worker died after writing) means nothing
            if unit in results or unit.removeprefix("ft-") in finetuned:
                (out / RUNNING / f"{unit}.pid").unlink(missing_ok=True)
        elsewhere = running_units(out)  # in flight, here or in a worker of an earlier start that is still alive
        busy = set().union(elsewhere, *(keys for _, keys in running.values()))
        units: list[tuple[dict[str, Any], set[str]]] = []
        if args.wordnet:  # first: short, and they need the final models, which a later session may not have
            keys = [run.key for run in downstream_runs(settings, results)
                    if run.key not in finetuned and f"ft-{run.key}" not in busy]
            if keys:
                units.append(({"kind": "finetune", "name": f"fine-tune {len(keys)}", "keys": keys},
                              {f"ft-{key}" for key in keys}))
        for group in ready_groups(settings, results):
            runs = tuple(run for run in group.runs if run.key not in busy)
            if runs:
                units.append(({"kind": "group", "name": group.name, "runs": [asdict(r) for r in runs]},
                              {r.key for r in runs}))
        # workers of an earlier start of the study take a slot too
        free = args.workers - len(running) - len({*elsewhere.values()} - {proc.pid for proc in running})
        # A free worker takes every `workers`-th ready unit and runs them one after the other: a process start
        # (seconds of imports and data loading) per share, not per unit, and what is left waits for the next worker.
        for share in (units[i::args.workers] for i in range(max(0, min(free, len(units))))):
            if not share:
                continue
            keys = set().union(*(k for _, k in share))
            names = "; ".join(unit["name"] for unit, _ in share)
            log = open(logs / f"{time.strftime('%H%M%S')}-{len(running)}.log", "w")
            print(f"[ttq] start: {names}", flush=True)
            running[subprocess.Popen(worker_command([unit for unit, _ in share], args), stdout=log,
                                     stderr=subprocess.STDOUT, env=env)] = (names, keys)
        if not running and not running_units(out):
            return
        time.sleep(1.0)
        for proc in [p for p in running if p.poll() is not None]:
            name, _ = running.pop(proc)
            if proc.returncode != 0:
                for other in running:
                    other.terminate()
                raise SystemExit(f"[ttq] worker for {name!r} failed with exit code {proc.returncode}; see {logs}")
