"""Removing what rfs leaves on disk: trees a package made read-only, and the temp files and
directories of rfs processes that were killed (named with their pid)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def remove_orphans(directory: Path, prefix: str) -> list[Path]:
    """Delete the `<prefix><pid>-…` files and directories in `directory` whose rfs process is
    gone (a SIGKILL allows no clean-up); those of live processes stay. Returns what went."""
    try:
        found = list(directory.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return []
    removed = []
    for path in found:
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue  # not named by rfs with a pid (older versions), or ours
        try:
            os.kill(int(pid), 0)
            continue  # alive (or the pid is in use again: keep, to be safe)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a directory tree, including read-only directories a package may have brought."""

    top = os.path.abspath(path)

    def retry(func: Callable[..., object], failed: str, exc: object) -> None:
        if isinstance(exc, tuple) and len(exc) > 1 and isinstance(exc[1], FileNotFoundError):
            return  # gone already: another rfs removing the same leftover got there first
        with contextlib.suppress(OSError):
            parent = os.path.dirname(os.path.abspath(failed))
            # Only inside the tree: the directory holding it (/tmp, say) is not ours to open
            # up or close.
            if os.path.commonpath([parent, top]) == top:
                os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)

    shutil.rmtree(path, onerror=retry)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
