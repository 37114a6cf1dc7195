"""Timing device work: the one step timer the trainer's metrics and every benchmark read the clock through.

An accelerator runs asynchronously: a CUDA call returns to the host as soon as its kernel is queued, so a clock read
around un-synchronized steps measures the launches, not the work, and whatever was still queued before the start is
billed to the step being timed. `StepTimer` therefore waits for the device before each of its two clock readings.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType

import torch

Device = torch.device | str | None
Clock = Callable[[], float]


def synchronize(device: Device) -> None:
    """Wait until the work queued on `device` has finished. CPU work runs when it is called, so there is nothing to
    wait for there (and for `None`: no device)."""
    if device is None:
        return
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:  # xpu, mps, hpu, ...: the backend-neutral API (torch >= 2.6)
        torch.accelerator.synchronize(device)


class StepTimer:
    """Seconds of the work done between `start()` and `stop()` (or inside a `with` block), on `clock`, with `device`
    synchronized before each clock reading. `clock` is wall time (`time.perf_counter`) unless given, e.g.
    `time.process_time` for this process's CPU time, which other jobs on a shared machine do not inflate.

        with StepTimer(device) as timer:
            step()
        timer.seconds

    `seconds` is NaN until the first `stop()`; a timer can be started again after it stops.
    """

    def __init__(self, device: Device = None, clock: Clock = time.perf_counter) -> None:
        self.device = device
        self.clock = clock
        self.seconds = math.nan
        self._started: float | None = None

    def start(self) -> StepTimer:
        synchronize(self.device)  # work queued before the step is not the step's
        self._started = self.clock()
        return self

    def stop(self) -> float:
        """The seconds since `start()`, also kept in `seconds`."""
        if self._started is None:
            raise RuntimeError("StepTimer.stop without start")
        synchronize(self.device)  # the step's queued work is the step's
        self.seconds = self.clock() - self._started
        self._started = None
        return self.seconds

    def __enter__(self) -> StepTimer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.stop()
        else:  # no synchronize: a failed step may have left the device in an error that would hide this one
            self._started = None
