"""Graceful stop: SIGTERM (SLURM preemption, scancel), Ctrl-C or SIGUSR1 ask the loop to stop at the next step
boundary, where it writes a checkpoint; a second signal exits at once (the last complete checkpoint stays valid).
SIGUSR1 is what launch/slurm sends the ranks before the time limit: SLURM signals every process of the job step, and
W&B's service process (Go) ignores SIGUSR1 but dies on SIGTERM, losing that start's W&B history."""
from __future__ import annotations

import signal
import time
from types import FrameType


class StopRequest:
    """A launcher may deliver the same stop twice (the `deepspeed` launcher forwards Ctrl-C that the terminal also
    sent to the ranks): a repeat within `repeat_window` seconds is the same request, not the "exit now" one."""

    def __init__(self, repeat_window: float = 5.0) -> None:
        self.signal: int | None = None
        self.repeat_window = repeat_window
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
        return self.signal is not None
