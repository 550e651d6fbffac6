"""One clean path for Ctrl-C and `kill`: SIGINT and SIGTERM both become KeyboardInterrupt.

Python turns SIGINT into KeyboardInterrupt by itself, but SIGTERM (what `kill`, systemd and CI
runners send) would end the process at once, skipping every `finally`: the running container,
the scratch directory, the half-written export and the temporary image would stay behind. So
both signals raise KeyboardInterrupt in the main thread, and the cleanup code that already runs
for Ctrl-C runs for SIGTERM too.

Only the first signal raises. Cleanup code (removing a container, deleting a temporary file)
must not itself be interrupted by an impatient second Ctrl-C, or it would leave exactly what it
was removing; a second signal is noted and ignored, and a third one gives up on cleaning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)
# After this many signals rfs stops protecting its cleanup and lets the interrupt through.
_GIVE_UP_AFTER = 3

_received: list[int] = []


def received() -> int | None:
    """The first signal received inside `handled()`, or None."""
    return _received[0] if _received else None


def name(signum: int) -> str:
    """ "SIGINT", "SIGTERM", …"""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum: int, frame: FrameType | None) -> None:
    del frame
    _received.append(signum)
    if len(_received) == 1 or len(_received) >= _GIVE_UP_AFTER:
        raise KeyboardInterrupt
    # os.write, not print: the main thread may be inside a write to stderr right now, and a
    # reentrant call into the same buffered stream raises RuntimeError.
    with contextlib.suppress(OSError):
        os.write(2, b"rfs: still cleaning up; interrupt once more to abandon it\n")


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt (see the module doc).

    A no-op outside the main thread, where Python cannot install signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _handler) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block; one that arrived meanwhile is handled when
    the block ends.

    For creating something that cleanup must know of: a signal between creating a temporary
    file and recording its name would leave the file behind, so both happen in the block and
    the interrupt comes right after, where cleanup covers it.
    """
    if threading.current_thread() is not threading.main_thread():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return
    # Not a signal mask: a mask holds a signal back from this thread only, and the kernel hands
    # a process's signal to any thread that does not block it (blake3's native hashing threads,
    # once a build has hashed), whose C handler has Python raise in the main thread at once.
    # A handler that only notes the signal holds it back whichever thread receives it.
    held: list[int] = []
    previous_handlers = {
        signum: signal.signal(signum, lambda signum, frame: held.append(signum))
        for signum in HANDLED
    }
    try:
        yield
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if held:  # handled now, by the handler it would have met
            signal.raise_signal(held[0])
