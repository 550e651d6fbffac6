"""Waiting for a condition, not for a fixed time: a test goes on as soon as the state it needs
is there, and fails with what it was waiting for once a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    """Return once `condition()` is true (checked every 5 ms); fail naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.005)
