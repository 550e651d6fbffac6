"""One clean path for Ctrl-C and `kill`: SIGINT and SIGTERM both become KeyboardInterrupt.

Python turns SIGINT into KeyboardInterrupt by itself, but SIGTERM (what `kill`, systemd and CI
runners send) would end the process at once, skipping every `finally`: the running container,
the scratch directory, the half-written export and the temporary image would stay behind. So
both signals raise KeyboardInterrupt in the main thread, and the cleanup code that already runs
for Ctrl-C runs for SIGTERM too.

A step running in a worker thread (`rfs build -j`, by default) never sees that exception. The
build ends what such steps wait on instead: their containers, their tools (`stop_children`:
what a Ctrl-C to the terminal does to them), and, in a thread marked `interruptible()`,
`check()` raises KeyboardInterrupt where the step reports progress (between the chunks of an
export). Either way the step cleans up as it does after a Ctrl-C in the main thread.

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
from pathlib import Path
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)
# After this many signals rfs stops protecting its cleanup and lets the interrupt through.
_GIVE_UP_AFTER = 3

_received: list[int] = []
_active: list[bool] = []  # inside handled(): _received is this block's
_thread = threading.local()  # .interruptible: a worker thread running a step


def received() -> int | None:
    """The first signal received inside `handled()`, or None."""
    return _received[0] if _received else None


def check() -> None:
    """In a thread marked `interruptible()`, raise KeyboardInterrupt once `handled()` has
    received a signal, and only once, as the main thread has it: the clean-up it starts (in
    its own deferred sections) must not itself be cut short. Elsewhere do nothing."""
    if _active and _received and getattr(_thread, "interruptible", False):
        _thread.interruptible = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Mark this worker thread, for the block, as one where `check()` raises after a signal
    (once; also at the end of a `deferred()` block)."""
    if threading.current_thread() is threading.main_thread():
        yield  # the signal itself raises here
        return
    _thread.interruptible = True
    try:
        yield
    finally:
        _thread.interruptible = False


def stop_children(signum: int = signal.SIGINT) -> int:
    """Send `signum` to this process's children in its own process group, as a Ctrl-C to the
    terminal would; the tools run `shielded` (rfs.host.proc), in a session of their own, are
    left to end. Returns how many were signalled."""
    group, sent = os.getpgrp(), 0
    for child in _children():
        try:
            if os.getpgid(child) == group:
                os.kill(child, signum)
                sent += 1
        except OSError:  # it ended meanwhile
            continue
    return sent


def _children() -> list[int]:
    """This process's children (every thread's: a worker thread may have started one)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


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
    _active.append(True)
    try:
        yield
    finally:
        _active.pop()
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
        # The main thread had the signal at once; a step's worker thread (-j) has it now, where
        # the main thread would have had it had the step run there.
        check()
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
