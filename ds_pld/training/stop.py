"""Graceful stop: SIGTERM (SLURM preemption, scancel) or Ctrl-C ask the loop to stop at the next step boundary,
where it writes a checkpoint; a second signal exits at once (the last complete checkpoint stays valid)."""
from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now")
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
