"""The study's results on disk, one JSON file per finished unit, written atomically: a stopped study loses at most
the units in flight, and a rerun skips every unit whose file exists.

  <out>/results/<run key>.json      a pretraining run: its spec and curve
  <out>/downstream/<run key>.json   the fine-tuning of that run's final model
  <out>/calibration.json            step time of the full model, plateau accuracy of the validation slice
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS, DOWNSTREAM, CALIBRATION = "results", "downstream", "calibration.json"


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
