"""One writer per run folder: rank 0 holds an advisory `flock` on `<output_dir>/.ds_pld.lock` for the run's life.

Two jobs on one `--output_dir` would interleave `metrics.jsonl` and overwrite each other's checkpoints and `final/`.
The kernel drops the lock when the holder exits, however it exits (SIGKILL, OOM, node reboot), so a crash never
leaves a stale lock; the file's text (host, pid) only says who holds it. On a shared filesystem the lock needs the
filesystem's lock support (NFSv4, Lustre mounted with `flock`); where locks are local only, it guards one node.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ds_pld.config_errors import ConfigError

LOCK_FILE = ".ds_pld.lock"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    """Acquire with `acquire()`; released by `release()` or by the process's exit."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._handle: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting, or raise RunFolderBusy naming the holder's host and pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: the holder's text stays
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 4096, 0).decode("utf-8", "replace")
            os.close(handle)
            raise RunFolderBusy(f"{str(self.path.parent)!r} is in use by another run ({describe(holder)}); one "
                                "run writes a run folder at a time: wait for it to exit or use another "
                                "--output_dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(info).encode(), 0)
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor drops the flock
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


def lock_run_folder(output_dir: Path, rank: int) -> RunFolderLock | None:
    """Rank 0 takes the run folder's lock (returned; None on other ranks); every rank learns the answer (one
    all-reduce at start-up) and a refused job exits on all ranks with the holder's host and pid."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    lock = RunFolderLock(output_dir) if rank == 0 else None
    message = ""
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderBusy as err:
            message = str(err)
    device = get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))
    refused = torch.tensor([float(bool(message))], device=device)
    dist.all_reduce(refused)
    if float(refused[0]) > 0:
        raise ConfigError(message or "the run folder is in use by another run (rank 0 names it)")
    return lock


def describe(text: str) -> str:
    """'host H, pid P, since T' from the lock file's text (which may be empty if the holder is just starting)."""
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder not yet recorded"
