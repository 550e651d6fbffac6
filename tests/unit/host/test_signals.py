"""rfs.host.signals for steps in worker threads (`rfs build -j`): `check()` raises only in a
thread marked `interruptible()` once a signal was received, and `stop_children()` signals this
process's tools but the shielded ones. (The handler itself: tests/unit/pipeline/test_cleanup.py;
interrupts of real exports and assemblies: tests/integration/test_faults.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

import pytest

from rfs.host import signals


def checked(mark: bool, deferred: bool = False) -> int:
    """How many of two looks raised KeyboardInterrupt in a new thread (marked `interruptible()`
    or not): `check()`, or (`deferred`) the end of a deferred() block."""
    raised: list[BaseException] = []

    def work() -> None:
        with signals.interruptible() if mark else contextlib.nullcontext():
            for _ in range(2):
                try:
                    if deferred:
                        with signals.deferred():
                            pass
                    else:
                        signals.check()
                except KeyboardInterrupt as exc:  # reported to the test
                    raised.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    return len(raised)


def test_check_raises_in_marked_worker_threads_after_a_signal_once() -> None:
    assert checked(mark=True) == 0  # no handled() block: nothing to stop
    with signals.handled():
        assert checked(mark=True) == 0  # no signal yet
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)  # let the handler run
        # Once, as in the main thread: the clean-up it starts is not cut short.
        assert checked(mark=True) == 1 and checked(mark=True, deferred=True) == 1
        # A helper thread (a progress poller) goes on.
        assert checked(mark=False) == 0 and checked(mark=False, deferred=True) == 0
        signals.check()  # the main thread: it had its own interrupt
    assert checked(mark=True) == 0  # the block is over


def _sigint_default() -> None:
    # A shell's background job (`cmd &` without job control) ignores SIGINT, and a child
    # inherits that: rfs's own handler resets it for the tools it starts, this test does here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_stop_children_signals_the_tools_but_the_shielded_ones() -> None:
    tool = subprocess.Popen(["sleep", "60"], preexec_fn=_sigint_default)
    shielded = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=_sigint_default)
    try:
        assert signals.stop_children() == 1
        assert tool.wait(10) == -signal.SIGINT
        assert shielded.poll() is None  # its own session: it ends by itself
    finally:
        for proc in (tool, shielded):
            proc.kill()
            proc.wait(10)
