"""Clean-up after killed rfs processes: their temp files are named with their pid."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
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
        pid = path.name[len(prefix):].split("-", 1)[0]
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
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed
