"""ds_pld.timing: the device is synchronized before each clock reading, so a step's time covers its queued work.

No test here measures time: the clocks are fakes that return set values, and the device synchronizations are
recorded by spies on the functions ds_pld.timing calls. The one real-device check needs CUDA.
"""
from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ds_pld import timing
from ds_pld.timing import StepTimer, synchronize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """What happened, in order: ("sync", device) for every CUDA or accelerator synchronization."""
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(("sync", device)))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: seen.append(("sync", device)))
    return seen


def fake_clock(events: list[tuple[str, object]], readings: list[float]) -> timing.Clock:
    values: Iterator[float] = iter(readings)

    def read() -> float:
        value = next(values)
        events.append(("clock", value))
        return value

    return read


def test_synchronize_waits_on_the_device_it_is_given(events: list[tuple[str, object]]) -> None:
    synchronize(torch.device("cuda", 1))
    synchronize("cuda:0")
    synchronize(torch.device("xpu", 0))  # any other accelerator: torch.accelerator
    assert events == [("sync", torch.device("cuda", 1)), ("sync", torch.device("cuda", 0)),
                      ("sync", torch.device("xpu", 0))]


def test_synchronize_does_nothing_for_the_cpu(events: list[tuple[str, object]]) -> None:
    synchronize(torch.device("cpu"))
    synchronize("cpu")
    synchronize(None)
    assert events == []


def test_the_device_is_synchronized_before_each_clock_reading(events: list[tuple[str, object]]) -> None:
    device = torch.device("cuda", 0)
    timer = StepTimer(device, fake_clock(events, [10.0, 12.5]))
    assert math.isnan(timer.seconds)
    timer.start()
    events.append(("work", None))
    assert timer.stop() == 2.5 and timer.seconds == 2.5
    # Syncing after the end reading would bill the step's queued work to nobody; syncing before the start reading
    # keeps earlier queued work out of this step.
    assert events == [("sync", device), ("clock", 10.0), ("work", None), ("sync", device), ("clock", 12.5)]


def test_with_block_times_its_body_and_the_timer_restarts(events: list[tuple[str, object]]) -> None:
    device = torch.device("cuda", 0)
    timer = StepTimer(device, fake_clock(events, [1.0, 4.0, 6.0, 6.5]))
    with timer as entered:
        events.append(("work", None))
    assert entered is timer and timer.seconds == 3.0
    with timer:
        pass
    assert timer.seconds == 0.5
    assert [kind for kind, _ in events] == ["sync", "clock", "work", "sync", "clock", "sync", "clock", "sync", "clock"]


def test_stop_without_start_raises_and_a_failed_step_is_not_timed(events: list[tuple[str, object]]) -> None:
    timer = StepTimer(torch.device("cuda", 0), fake_clock(events, [1.0, 2.0]))
    with pytest.raises(RuntimeError, match="without start"):
        timer.stop()
    with pytest.raises(ValueError, match="step failed"), timer:
        raise ValueError("step failed")
    # No synchronize after a failed step (a device error would hide the step's own), and no time for it.
    assert events == [("sync", torch.device("cuda", 0)), ("clock", 1.0)] and math.isnan(timer.seconds)
    with pytest.raises(RuntimeError, match="without start"):
        timer.stop()


def test_a_cpu_timer_reads_its_clock_and_synchronizes_nothing(events: list[tuple[str, object]]) -> None:
    timer = StepTimer(torch.device("cpu"), fake_clock(events, [3.0, 3.25]))
    with timer:
        pass
    assert timer.seconds == 0.25 and events == [("clock", 3.0), ("clock", 3.25)]
    assert StepTimer().clock is time.perf_counter  # wall time unless a clock is given


def test_the_study_clock_reads_through_the_step_timer(events: list[tuple[str, object]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/ttq/budget.py's Clock: CPU time or wall time, the arm's device synchronized before each reading."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    budget = importlib.import_module("ttq.budget")
    assert budget.Clock("cpu").timer.clock is time.process_time
    clock = budget.Clock("wall", "cuda:0")
    assert clock.timer.clock is time.perf_counter and clock.timer.device == "cuda:0"
    clock.timer.clock = fake_clock(events, [1.0, 3.0, 5.0, 5.5])
    clock.start()
    assert clock.stop() == 2.0
    clock.start()
    clock.stop()
    assert clock.total == 2.5
    assert [kind for kind, _ in events] == ["sync", "clock"] * 4
    assert {device for kind, device in events if kind == "sync"} == {torch.device("cuda", 0)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the CI machine has none")
def test_on_cuda_the_queued_work_is_done_when_the_clock_is_read() -> None:
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    stream = torch.cuda.current_stream(device)
    readings: list[bool] = []

    def clock() -> float:
        readings.append(stream.query())  # True: nothing left queued on the stream
        return time.perf_counter()

    with StepTimer(device, clock):
        for _ in range(20):
            a = a @ a / 4096  # ~3 TFLOP of work, queued far faster than it runs
        queued = not stream.query()
    assert queued, "the work finished before the block ended: this check would prove nothing"
    assert readings == [True, True]
