"""`[[copy]]`: package files placed into the first command's container before it starts.

Like a Dockerfile `COPY`: the files land in the container's own filesystem (so commands can
change them, and the commit keeps them), with the owner and mode the build script gives, never
the checkout's. The engine receives one tar archive at `/` (`PUT /containers/{id}/archive`,
which Docker and Podman both offer) before the container starts.

Symlinks to directories on the way are written through, as `cp -r` into the container would:
both engines' archive extraction would otherwise replace a merged-/usr `/sbin -> usr/sbin` link
by a directory holding only the copied files, and `/sbin/init` would be gone. So every
directory an entry passes through (and every directory entry itself) is asked about first
(`resolve`: the engine's path stat), and entries below a symlink to a directory are renamed to
the directory it leads to. A file copied onto a symlink replaces the link, as an overlay does.

Modes follow the overlays' rule (rfs.fs.overlay): without `mode`, directories 0755 and files
0755 or 0644 by the owner's execute bit (the only bit the key holds); with it, files get
`mode` and directories `mode` plus search wherever it grants read.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rfs.errors import RfsError
from rfs.script.model import Copy

# Asked about a container path: the directory a symlink there leads to, else None.
Resolve = Callable[[str], "str | None"]


@dataclass(frozen=True)
class _Item:
    path: str  # absolute, in the container
    kind: str  # "dir", "file" or "symlink"
    mode: int
    uid: int
    gid: int
    host: Path | None = None  # a file's content
    target: str = ""  # a symlink's target


@dataclass(frozen=True)
class CopyIn:
    """The copies of one build, each with its snapshot copy (file or tree) on the host."""

    copies: tuple[tuple[Copy, Path], ...]
    mtime: int = 0  # every entry's time: times are not keyed

    def write(self, out: BinaryIO, resolve: Resolve) -> int:
        """Write the tar archive the engine extracts at `/`; return how many entries."""
        items = [item for copy, host in self.copies for item in _items(copy, host)]
        through = _WriteThrough(resolve)
        count = 0
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for item in items:
                path = through.path(item.path, follow_last=item.kind == "dir")
                if path == "/":
                    continue  # the container's root keeps its own owner and mode
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mode, info.uid, info.gid, info.mtime = (
                    item.mode,
                    item.uid,
                    item.gid,
                    self.mtime,
                )
                info.uname = info.gname = ""  # numeric owners only: the image's names rule
                if item.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif item.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, item.target
                    tar.addfile(info)
                else:
                    assert item.host is not None
                    with item.host.open("rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
                count += 1
        return count


class _WriteThrough:
    """Maps container paths through the symlinks to directories already in the container."""

    def __init__(self, resolve: Resolve) -> None:
        self.resolve = resolve
        self.known: dict[str, str] = {}  # directory path -> where it really is

    def path(self, path: str, *, follow_last: bool) -> str:
        parts = [p for p in path.split("/") if p]
        current = ""
        for i, part in enumerate(parts):
            current = f"{current}/{part}"
            if i == len(parts) - 1 and not follow_last:
                break
            found = self.known.get(current)
            if found is None:
                target = self.resolve(current)
                found = self.known[current] = _clean(target) if target else current
            current = found
        return current or "/"


def _clean(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:  # the engines answer with a resolved path; anything else is refused
        raise RfsError(f"the engine resolved a symlink to {path!r}, not a clean path")
    return "/" + "/".join(parts)


def _items(copy: Copy, host: Path) -> list[_Item]:
    uid, gid = copy.uid or 0, copy.gid or 0

    def mode_of(st: os.stat_result) -> int:
        if copy.mode is not None:
            if stat.S_ISDIR(st.st_mode):
                return (copy.mode & 0o777) | ((copy.mode & 0o444) >> 2)
            return copy.mode
        if stat.S_ISDIR(st.st_mode):
            return 0o755
        return 0o755 if st.st_mode & stat.S_IXUSR else 0o644

    top = host.lstat()
    if not stat.S_ISDIR(top.st_mode):
        return [_Item(copy.destination, "file", mode_of(top), uid, gid, host=host)]
    items = [_Item(copy.destination, "dir", mode_of(top), uid, gid)]
    base = copy.destination.rstrip("/")
    for dirpath, dirnames, filenames in os.walk(host):
        dirnames.sort()
        rel = os.path.relpath(dirpath, host)
        where = base if rel == "." else f"{base}/{rel}"
        for name in sorted(dirnames + filenames):
            child = Path(dirpath) / name
            st = child.lstat()
            dest = f"{where}/{name}"
            if stat.S_ISLNK(st.st_mode):
                items.append(_Item(dest, "symlink", 0o777, uid, gid, target=os.readlink(child)))
            elif stat.S_ISDIR(st.st_mode):
                items.append(_Item(dest, "dir", mode_of(st), uid, gid))
            else:
                items.append(_Item(dest, "file", mode_of(st), uid, gid, host=child))
    # Parents before children, as the walk gives them; symlinked directories are not walked.
    items[1:] = sorted(items[1:], key=lambda item: item.path.split("/"))
    return items
