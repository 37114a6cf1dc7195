"""Reads a W&B run file (`run-<id>.wandb`, a LevelDB-style log of protobuf records) so tests can check what a real
offline run recorded. wandb 0.31 ships the protobuf schema but no Python reader for the file."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", 2-byte magic, 1-byte version
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path, wait_s: float = 0.0) -> list[wandb_internal_pb2.Record]:
    """All records. W&B's service writes the file asynchronously, even after `finish()` returns: with `wait_s`, keep
    reading until the run's closing `exit` record is there (for runs that were finished, not killed)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = _parse(Path(path).read_bytes(), path)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() >= deadline:
            return records
        time.sleep(0.5)


def _parse(data: bytes, path: str | Path) -> list[wandb_internal_pb2.Record]:
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


def history(path: str | Path, wait_s: float = 0.0) -> list[dict[str, str]]:
    """The logged rows: key -> JSON-encoded value."""
    rows = []
    for record in read_records(path, wait_s):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def run_id(path: str | Path, wait_s: float = 0.0) -> str | None:
    for record in read_records(path, wait_s):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    return None


def run_files(output_dir: str | Path) -> list[Path]:
    """The offline run files of a training output folder, one per start, oldest first (named by start time)."""
    return sorted(Path(output_dir).glob("wandb/offline-run-*/run-*.wandb"))


def logged_steps(path: str | Path, wait_s: float = 0.0) -> list[int]:
    return [int(json.loads(row["step"])) for row in history(path, wait_s)]
