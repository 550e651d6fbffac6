"""Advisory file locks (flock) that keep concurrent rfs processes on one cache directory apart.

flock rather than a lock row in the index or a lock library: the kernel releases a flock when
its process dies, however it dies, so a killed build never leaves a lock that blocks the next
one, and the standard library has it on every platform rfs runs on (Linux).

Two locks per step key, in `<cache>/locks/`:
    <key>.build   exclusive while a process builds the step: a second process wanting the same
                  step waits, then finds it built and reuses it (built once, not twice);
    <key>.use     shared by every build that may use the step's result, from planning to the
                  end; eviction takes it exclusively without waiting and skips busy entries,
                  so eviction never removes what a running build relies on.

A lock file may be unlinked (when its entry is evicted) while another process is about to lock
it; `FileLock` re-checks after locking that its descriptor still is the file at the path, so
two processes never hold "the same" lock on two different inodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


class FileLock:
    """One flock on one path; `acquire` returns False instead of waiting when `wait` is False."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; True once held, False if busy and `wait` is False."""
        if self._fd is not None:
            return True
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        if not wait:
            mode |= fcntl.LOCK_NB
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # unlinked (evicted) while we waited: lock the new file instead

    def release(self, unlink: bool = False) -> None:
        """Drop the lock; with `unlink`, delete the file first (only when held exclusively)."""
        if self._fd is None:
            return
        if unlink and not self.shared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


class Locks:
    """The per-key build and use locks of one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, FileLock] = {}

    def _path(self, key: str, kind: str) -> Path:
        return self.root / f"{key}.{kind}"

    def build_lock(self, key: str, on_wait: Callable[[], None] | None = None) -> FileLock:
        """Take the build lock of `key` and return it (held); `on_wait` is called once if
        another process has it, before waiting for it."""
        lock = FileLock(self._path(key, "build"))
        if not lock.acquire(wait=False):
            if on_wait is not None:
                on_wait()
            lock.acquire(wait=True)
        return lock

    @contextlib.contextmanager
    def building(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the build lock of `key` for the block (see `build_lock`)."""
        lock = self.build_lock(key, on_wait)
        try:
            yield
        finally:
            lock.release()

    def hold(self, keys: set[str]) -> None:
        """Mark `keys` as in use by this process until `release_all` (or its exit)."""
        for key in sorted(keys - set(self._held)):
            lock = FileLock(self._path(key, "use"), shared=True)
            lock.acquire(wait=True)
            self._held[key] = lock

    def release_all(self) -> None:
        """Release every use lock this process holds."""
        for lock in self._held.values():
            lock.release()
        self._held.clear()

    @contextlib.contextmanager
    def evicting(self, key: str) -> Iterator[bool]:
        """Yield True when no build uses `key` (then it may be dropped), else False."""
        lock = FileLock(self._path(key, "use"))
        if key in self._held or not lock.acquire(wait=False):
            yield False
            return
        try:
            yield True
        finally:
            # The entry is gone: its lock files go too, so locks/ does not grow forever.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key, "build"))
            lock.release(unlink=True)

    def sweep(self, known: set[str]) -> None:
        """Delete the lock files of keys not in `known` that no process holds."""
        for path in sorted(self.root.glob("*.use")):
            key = path.name.removesuffix(".use")
            if key not in known:
                with self.evicting(key):
                    pass  # unlinked on the way out when free
