"""The pretraining loop, top to bottom: step, then the callbacks (validate, log, checkpoint); a divergence rolls
back or ends the run, a stop request (signal, dead launcher, --stop_at_step) checkpoints and exits; at max_steps the
final outputs are written. The pieces are in ds_pld.training (run, step, divergence, evaluate, outputs) and
ds_pld.algorithms."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from ds_pld.algorithms import Event, run_event
from ds_pld.training.config import RunConfig
from ds_pld.training.divergence import CannotRollBack, TrainingDiverged
from ds_pld.training.run import build_run
from ds_pld.training.step import train_step
from ds_pld.training.stop import StopRequest, deepspeed_launchers

EXIT_DIVERGED = 3  # the loss or gradient norm stopped being finite; nothing was saved from those weights
EXIT_STOPPED = 143  # stopped by a signal, after a checkpoint


def pretrain(config: RunConfig, output_dir: str | Path, *, resume: bool = False, stop_at_step: int | None = None,
             replan_schedule: bool = False, allow_world_size_change: bool = False) -> int:
    """Train (or continue, with `resume`) to `training.max_steps`; returns the process's exit status. Needs an
    initialized process group; see build_run for the resume flags."""
    run = build_run(config, output_dir, resume, replan_schedule=replan_schedule,
                    allow_world_size_change=allow_world_size_change)
    cfg, log = config.training, run.metrics_log
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=run.rank != 0, dynamic_ncols=True, desc="pretrain")
    with StopRequest(watch=deepspeed_launchers()) as stop:
        while run.step < cfg.max_steps:
            try:
                record, stopping = train_step(run, stop.requested or run.step + 1 == stop_at_step)
            except TrainingDiverged as err:
                try:
                    message = run.guard.roll_back(run.state, log.rewind)
                except CannotRollBack as refusal:
                    log.write(err.record)
                    bar.close()
                    if run.rank == 0:
                        why = "" if cfg.on_divergence == "stop" else f" (no rollback: {refusal})"
                        print(f"error: {err}{why}", file=sys.stderr, flush=True)
                    log.tracker.finish()
                    return EXIT_DIVERGED
                if run.rank == 0:
                    bar.write(f"[ds_pld] training diverged at step {err.step}; {message}")
                bar.n = run.step
                continue
            run_event(run.callbacks, Event.AFTER_STEP, run.state)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", theta=f"{record.get('pld_theta') or 1:.3f}",
                            samples_s=f"{record['samples_per_sec']:.1f}")
            if stopping and run.step < cfg.max_steps:  # a stop at the last step just finishes
                log.tracker.finish()
                why = f" ({stop.launcher_gone})" if stop.launcher_gone else ""
                bar.write(f"stopped at step {run.step}{why}; continue with --resume")
                # After the launcher's death nobody reads the status, and a non-zero one would make a surviving
                # deepspeed.launcher.launch SIGTERM the other ranks (and their W&B service) while they finish.
                return EXIT_STOPPED if stop.signal is not None else 0
    bar.close()
    run_event(run.callbacks, Event.FIT_END, run.state)
    if run.rank == 0:
        print(f"done: {run.step} steps; model in {run.output_dir / 'final'}, metrics in "
              f"{run.output_dir / 'metrics.jsonl'}")
    return 0
