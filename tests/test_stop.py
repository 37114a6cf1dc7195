"""Graceful stop: one request per signal burst, and a later second signal exits at once."""
from __future__ import annotations

import os
import signal

import pytest

from ds_pld.training.stop import StopRequest


def test_signal_requests_a_stop_and_a_repeat_burst_is_the_same_request():
    with StopRequest(repeat_window=60.0) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # forwarded duplicate: must not abort the checkpoint
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) != stop._handle, "handlers are restored on exit"


def test_second_signal_after_the_window_exits_at_once():
    with StopRequest(repeat_window=0.0) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
