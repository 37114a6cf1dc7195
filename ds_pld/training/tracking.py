"""Weights & Biases tracking: one run per job, continued when the job resumes, offline when there is no API key."""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ds_pld.training.config import WandbConfig

RUN_FILE = "wandb_run.json"


def job_group() -> str | None:
    """All ranks (and requeues) of one cluster job share a group named after the job."""
    for key in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if os.environ.get(key):
            return f"job-{os.environ[key]}"
    return None


def wandb_mode() -> str:
    """Online only with credentials; otherwise offline (never a prompt, never a network wait)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class WandbTracker:
    """Logs scalar metrics to W&B. The run id is kept in `<output_dir>/wandb_run.json`, so `--resume` continues
    the same run. Only rank 0 logs unless `log_all_ranks` (then each rank is its own run in the job's group)."""

    def __init__(self, config: WandbConfig, output_dir: str | Path, rank: int, run_config: Mapping[str, Any],
                 resuming: bool):
        import wandb

        self.run = None
        self._run_file: Path | None = None
        self._identity: dict[str, str] = {}
        self._complete_through = 0  # W&B holds every step up to here: the last start that closed cleanly
        self._last_step = 0
        if not config.enabled or (rank != 0 and not config.log_all_ranks):
            return
        output_dir = Path(output_dir)
        run_file = output_dir / (RUN_FILE if rank == 0 else f"wandb_run_rank{rank}.json")
        saved = json.loads(run_file.read_text()) if resuming and run_file.is_file() else {}
        run_id = saved.get("id") or uuid.uuid4().hex[:12]
        mode = wandb_mode()
        group = config.group or job_group() or output_dir.resolve().name
        settings = dict(project=config.project, entity=config.team, group=group, tags=list(config.tags),
                        name=f"{group}-rank{rank}" if config.log_all_ranks else group, id=run_id, resume="allow",
                        dir=str(output_dir), mode=mode, config=dict(run_config))
        self.run = self._init_when_free(wandb, settings)
        if self.run is None:
            return
        self._run_file = run_file
        self._identity = {"id": run_id, "mode": mode, "dir": self.run.dir}
        self._complete_through = int(saved.get("complete_through", 0))
        self._save_run_file()
        print(f"[ds_pld] W&B run {run_id} ({mode}) in {Path(self.run.dir).parent}"
              + (" -- sync later with `wandb sync <that folder>`" if mode == "offline" else ""), flush=True)

    @staticmethod
    def _init_when_free(wandb: Any, settings: dict[str, Any], wait_s: float = 120.0) -> Any:
        """wandb.init, waiting while the previous start of this job (killed, or just exited) still holds the run
        id in its W&B service; past `wait_s` training goes on without W&B rather than failing."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return wandb.init(**settings)
            except Exception as err:  # wandb raises its own error types, which vary by version
                if "in use" not in str(err) or time.monotonic() > deadline:
                    print(f"[ds_pld] W&B disabled for this start ({type(err).__name__}: {err}); metrics.jsonl "
                          f"still has every step", flush=True)
                    return None
                time.sleep(2.0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
                self._last_step = step
            except Exception as err:
                self._give_up(err)

    def replay(self, records: Iterable[Mapping[str, Any]], through_step: int) -> int:
        """Log again, on resume, the metrics.jsonl steps up to the checkpoint that W&B may not have: those after the
        last start that closed cleanly. A start stopped by SIGTERM (SLURM preemption, `scontrol requeue`) or killed
        loses W&B's service with it, and with the service whatever it had not written yet. Online, steps the server
        already has are skipped (a resumed run's step counter starts after them); offline, the next file holds them
        again and W&B ignores a step below the run's current one. Returns how many steps were logged."""
        if self.run is None:
            return 0
        first = max(self._complete_through + 1, int(getattr(self.run, "step", 0) or 0))
        missing = [r for r in records if first <= r.get("step", 0) <= through_step]
        for record in missing:
            self.log(record, step=record["step"])
        if missing:
            print(f"[ds_pld] W&B: logged steps {first}-{through_step} again from metrics.jsonl (the previous start "
                  f"did not close its W&B run)", flush=True)
        return len(missing)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                self._give_up(err)
                return
            self._complete_through = max(self._complete_through, self._last_step)
            self._save_run_file()

    def _save_run_file(self) -> None:
        """Written atomically: a start killed while writing must not lose the run id."""
        if self._run_file is None:
            return
        tmp = self._run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._identity, "complete_through": self._complete_through}))
        tmp.replace(self._run_file)

    def _give_up(self, err: Exception) -> None:
        """Tracking must never end training: SLURM's SIGTERM (preemption, requeue, scancel) reaches every process
        of the job step, W&B's service process too, and the next log call fails while the ranks are on their way to
        the checkpoint. metrics.jsonl keeps every step; a resumed start continues the same W&B run."""
        print(f"[ds_pld] W&B logging stopped for this start ({type(err).__name__}: {err}); training goes on",
              flush=True)
        self.run = None
