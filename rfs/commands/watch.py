"""`rfs build --watch`: build, then build again whenever a file of the package changes.

Changes are found by polling (size, mtime, inode) of every file in the package twice a second.
A package is a build script and tens of files, so a poll costs well under a millisecond, works
on every filesystem (bind mounts, NFS, the 9p/virtiofs shares of VMs and WSL, where inotify
misses changes made on the other side) and adds no dependency; a notify library such as
watchfiles would save nothing noticeable here. A burst of writes (an editor saving several
files, a `git checkout`) starts one build: the tree must stay unchanged for DEBOUNCE_S first.

A failed build does not end the watch: the error is shown and the next change builds again.
Ctrl-C ends it: between builds with exit status 0, during a build as an interrupted build
(after the build's own clean-up) with 130.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from rfs.errors import EXIT_INTERRUPTED, EXIT_OK, Interrupted, RfsError

POLL_S = 0.5
DEBOUNCE_S = 0.3

Snapshot = dict[str, tuple[int, int, int]]


def snapshot(root: Path, ignore: Iterable[Path] = ()) -> Snapshot:
    """(size, mtime_ns, inode) of every file under `root` (or of `root` itself, a file).

    Hidden directories (.git, editors' swap directories) and the `ignore` paths (the image
    being written, when it lies inside the package) are left out.
    """
    skip = {os.path.abspath(p) for p in ignore}
    found: Snapshot = {}
    if not root.is_dir():
        try:
            st = root.stat()
        except OSError:
            return found
        return {str(root): (st.st_size, st.st_mtime_ns, st.st_ino)}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = os.path.join(dirpath, name)
            # The image's own temporary file (".<name>.rfs-tmp-…") and editors' swap files.
            if os.path.abspath(path) in skip or ".rfs-tmp-" in name or name.endswith(".swp"):
                continue
            try:
                st = os.stat(path)
            except OSError:  # deleted while we looked: the next poll sees it gone
                continue
            found[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def changed(old: Snapshot, new: Snapshot) -> list[str]:
    """The paths added, removed or modified between two snapshots."""
    return sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))


def wait_for_change(
    root: Path,
    before: Snapshot,
    ignore: Iterable[Path] = (),
    poll_s: float = POLL_S,
    debounce_s: float = DEBOUNCE_S,
) -> tuple[Snapshot, list[str]]:
    """Block until the tree under `root` differs from `before` and then holds still."""
    ignore = list(ignore)
    while True:
        time.sleep(poll_s)
        now = snapshot(root, ignore)
        if now == before:
            continue
        while True:  # let a burst of writes finish
            time.sleep(debounce_s)
            settled = snapshot(root, ignore)
            if settled == now:
                return settled, changed(before, settled)
            now = settled


def _watched(package: Path) -> Path:
    """What to poll: a package directory or archive itself; for a build script named directly,
    its directory, which is the package it references files from."""
    from rfs.script.archive import PackageType, detect

    if package.is_file() and detect(package) is PackageType.BUILD_SCRIPT:
        return package.resolve().parent
    return package


def watch(
    package: Path,
    build: Callable[[], int],
    *,
    ignore: Iterable[Path] = (),
    out: TextIO,
    poll_s: float = POLL_S,
) -> int:
    """Run `build` now and after every change of the package until Ctrl-C."""
    root = _watched(package)
    ignore = [Path(p) for p in ignore if p is not None]
    state = snapshot(root, ignore)
    try:
        while True:
            try:
                build()
            except Interrupted:
                raise
            except RfsError as exc:  # shown, and the next change gets another try
                from rfs.errors import report

                report(exc)
            # What the build itself changed (an image inside the package) is not a change.
            state = snapshot(root, ignore)
            print(f"rfs: watching {root} for changes (Ctrl-C ends)", file=out, flush=True)
            state, paths = wait_for_change(root, state, ignore, poll_s)
            shown = ", ".join(os.path.relpath(p, root) if root.is_dir() else p for p in paths[:3])
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            print(f"rfs: changed: {shown}{more}: building again", file=out, flush=True)
    except KeyboardInterrupt:
        print("rfs: stopped watching", file=out, flush=True)
        return EXIT_OK
    except Interrupted:
        print("rfs: stopped watching", file=out, flush=True)
        return EXIT_INTERRUPTED
