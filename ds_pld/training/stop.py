"""Graceful stop: SIGTERM (SLURM preemption, scancel), Ctrl-C or SIGUSR1 ask the loop to stop at the next step
boundary, where it writes a checkpoint; a second signal exits at once (the last complete checkpoint stays valid).
SIGUSR1 is what launch/slurm sends the ranks before the time limit: SLURM signals every process of the job step, and
W&B's service process (Go) ignores SIGUSR1 but dies on SIGTERM, losing that start's W&B history."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from types import FrameType

import psutil

LAUNCH_MODULE = "deepspeed.launcher.launch"
RUNNER_NAMES = ("deepspeed.launcher.runner", "deepspeed", "ds")


class StopRequest:
    """A launcher may deliver the same stop twice (the `deepspeed` launcher forwards Ctrl-C that the terminal also
    sent to the ranks): a repeat within `repeat_window` seconds is the same request, not the "exit now" one."""

    def __init__(self, repeat_window: float = 5.0, watch: Sequence[psutil.Process] = ()) -> None:
        self.signal: int | None = None
        self.repeat_window = repeat_window
        self.watch = list(watch)
        self.launcher_gone: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.repeat_window:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now")

    @property
    def requested(self) -> bool:
        """A signal arrived, or a launcher process above this rank is gone (read once per step: a few /proc
        reads, no sync)."""
        if self.signal is None and self.launcher_gone is None:
            self.launcher_gone = next((describe(proc) for proc in self.watch if not alive(proc)), None)
        return self.signal is not None or self.launcher_gone is not None


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a launcher killed by a signal stays a zombie until its own parent reaps it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(proc: psutil.Process) -> str:
    return f"the launcher process {proc.pid} exited"


def _command(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def deepspeed_launchers() -> list[psutil.Process]:
    """The `deepspeed` launcher chain above this rank, to watch: `deepspeed.launcher.launch` (our parent) and the
    `deepspeed` command above it. SIGTERM or SIGINT to the `deepspeed` command ends only that command (DeepSpeed
    0.19.8 forwards signals only for multi-node pdsh runs) and leaves `launch` and the ranks running; watching
    it is how the ranks learn that they were asked to stop. Empty under any other launcher."""
    try:
        parent = psutil.Process(os.getppid())
    except psutil.Error:
        return []
    if LAUNCH_MODULE not in _command(parent)[:4]:
        return []
    chain = [parent]
    try:
        runner = parent.parent()
    except psutil.Error:
        runner = None
    if runner is not None and any(os.path.basename(arg) in RUNNER_NAMES for arg in _command(runner)[:3]):
        chain.append(runner)
    return chain
