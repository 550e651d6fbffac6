"""Byte progress of child processes, read from Linux's /proc: how much they have read so far.

The assembly streams the export into `mke2fs -d -` with sendfile, in spans as large as the
whole export, so the writer has no natural place to count bytes; mke2fs's own read counter
(`rchar` in /proc/PID/io) does, and needs nothing from the filesystem code. Best effort: where
/proc is missing or unreadable the callback is simply never called.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_POLL_S = 0.25


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's, since a thread may have started one)."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return found


def read_bytes(pid: int) -> int | None:
    """How many bytes process `pid` has read (any file or pipe), or None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _named(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


@contextlib.contextmanager
def child_reads(
    name: str | None, on_progress: Callable[[int], None], interval: float = _POLL_S
) -> Iterator[None]:
    """While the block runs, call `on_progress(bytes read)` by our child processes named `name`
    (None: every child, whichever tool the filesystem type runs).

    Calls come from a background thread, about every `interval` seconds and only when the count
    grew; the thread is stopped and joined when the block ends.
    """
    stop = threading.Event()
    me = os.getpid()

    def poll() -> None:
        last = -1
        while not stop.wait(interval):
            total = 0
            seen = False
            for child in _children(me):
                if name is None or _named(child, name):
                    count = read_bytes(child)
                    if count is not None:
                        total += count
                        seen = True
            if seen and total > last:
                last = total
                with contextlib.suppress(Exception):  # a display glitch must not stop a build
                    on_progress(total)

    thread = threading.Thread(target=poll, name=f"rfs-progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
