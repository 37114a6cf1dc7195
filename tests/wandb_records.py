"""Reads a W&B run file (`run-<id>.wandb`, a LevelDB-style log of protobuf records) so tests can check what a real
offline run recorded. wandb 0.31 ships the protobuf schema but no Python reader for the file."""
from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", 2-byte magic, 1-byte version
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
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


def history(path: str | Path) -> list[dict[str, str]]:
    """The logged rows: key -> JSON-encoded value."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def run_id(path: str | Path) -> str | None:
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    return None
