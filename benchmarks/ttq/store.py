"""The study's results on disk, one JSON file per finished unit, written atomically: a stopped study loses at most
the units in flight, and a rerun skips every unit whose file exists.

  <out>/results/<run key>.json      a pretraining run: its spec and curve
  <out>/downstream/<run key>.json   the fine-tuning of that run's final model
  <out>/calibration.json            step time of the full model, plateau accuracy of the validation slice
  <out>/running/<unit>.pid          a unit in flight and its worker's pid: a second study process leaves it alone
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS, DOWNSTREAM, CALIBRATION, RUNNING = "results", "downstream", "calibration.json", "running"


def write_atomic(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def read_folder(folder: Path) -> dict[str, Any]:
    """key (file stem) -> content, for every finished file in `folder`."""
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mark_running(out: Path, unit: str) -> Path:
    path = out / RUNNING / f"{unit}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))
    return path


def running_units(out: Path) -> dict[str, int]:
    """Units whose worker is still alive, and that worker's pid (a marker left by a killed worker does not count)."""
    alive = {}
    for path in (out / RUNNING).glob("*.pid") if (out / RUNNING).is_dir() else ():
        try:
            pid = int(path.read_text() or 0)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        alive[path.stem] = pid
    return alive
