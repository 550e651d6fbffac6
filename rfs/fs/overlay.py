"""Overlay entries: files, directories and symlinks rfs adds to an image after the export."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import EnvironmentProblem, Problem, ScriptError
from rfs.fs.selection import check_destination


@dataclass(frozen=True)
class OverlayEntry:
    """One path written into the image after the export, so it always wins."""

    destination: str  # absolute path in the image, e.g. "/etc/resolv.conf"
    content: bytes | None  # file content for a regular file; None for a directory (or symlink)
    mode: int  # permission bits incl. setuid etc. (e.g. 0o644)
    uid: int = 0
    gid: int = 0
    is_dir: bool = False
    symlink: str | None = None  # set: a symbolic link pointing here (content must be None)

    def check(self) -> str:
        """Validate the entry and return its normalised destination; raise ScriptError if bad."""
        where = f"overlay {self.destination!r}"
        path = check_destination(self.destination, where)
        kinds = (self.content is not None) + self.is_dir + (self.symlink is not None)
        problems = []
        if kinds != 1:
            problems.append("needs exactly one of content, is_dir or symlink")
        if not 0 <= self.mode <= 0o7777:
            problems.append(f"mode {self.mode:#o} is not a permission mode (0 to 0o7777)")
        if not (0 <= self.uid < 2**32 and 0 <= self.gid < 2**32):
            problems.append("uid and gid must be between 0 and 2**32-1")
        if self.symlink is not None and (not self.symlink or "\x00" in self.symlink):
            problems.append("symlink target must be a non-empty path without NUL")
        if path == "/" and not self.is_dir:
            problems.append("only a directory can be placed at /")
        if problems:
            raise ScriptError([Problem(where, p) for p in problems])
        return path


def overlay_entries_from_dir(
    host_dir: Path,
    destination: str,
    *,
    uid: int = 0,
    gid: int = 0,
    mode: int | None = None,
    keep_modes: bool = False,
) -> list[OverlayEntry]:
    """Expand a host directory (an `is_directory` overlay) into entries under `destination`.

    Owners are set to `uid`:`gid`, never copied from the host, so a checkout by another user
    gives the same image. Modes are normalised the same way (a umask or a checkout tool must not
    change the image): with `mode`, every file gets it and every directory gets it plus search
    permission wherever it grants read (0640 gives 0750); without it, directories get 0755 and
    files 0755 if the owner may execute them, else 0644. `keep_modes` copies the host's modes.

    Symlinks stay symlinks with their target text unchanged: they are resolved inside the image,
    never on the host. The directory itself is entry 0; the rest follow in sorted order, parents
    before children. Sockets, FIFOs and devices are refused.
    """
    base = check_destination(destination, f"overlay {destination!r}")
    try:
        root_stat = host_dir.stat()
    except OSError as exc:
        problem = Problem(f"overlay {destination!r}", f"cannot read {host_dir}: {exc}")
        raise ScriptError([problem]) from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise ScriptError([Problem(f"overlay {destination!r}", f"{host_dir} is not a directory")])

    if mode is not None and not 0 <= mode <= 0o7777:
        raise ScriptError([Problem(f"overlay {destination!r}", f"mode {mode:#o} is invalid")])

    def mode_of(st: os.stat_result) -> int:
        if keep_modes:
            return stat.S_IMODE(st.st_mode)
        if mode is not None:
            if stat.S_ISDIR(st.st_mode):
                return (mode & 0o777) | ((mode & 0o444) >> 2)
            return mode
        if stat.S_ISDIR(st.st_mode):
            return 0o755
        return 0o755 if st.st_mode & stat.S_IXUSR else 0o644

    entries = [OverlayEntry(base, None, mode_of(root_stat), uid, gid, is_dir=True)]
    try:
        entries.extend(_walk(host_dir, base, uid, gid, mode_of))
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read overlay directory {host_dir}: {exc}") from exc
    return entries


def _walk(
    host_dir: Path, base: str, uid: int, gid: int, mode_of: Callable[[os.stat_result], int]
) -> list[OverlayEntry]:
    entries: list[OverlayEntry] = []
    with os.scandir(host_dir) as scan:
        children = sorted(scan, key=lambda d: os.fsencode(d.name))
    for child in children:
        dest = (base.rstrip("/") + "/" + child.name) if base != "/" else "/" + child.name
        st = child.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(child.path)
            entries.append(OverlayEntry(dest, None, 0o777, uid, gid, symlink=target))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(OverlayEntry(dest, None, mode_of(st), uid, gid, is_dir=True))
            entries.extend(_walk(Path(child.path), dest, uid, gid, mode_of))
        elif stat.S_ISREG(st.st_mode):
            content = Path(child.path).read_bytes()
            entries.append(OverlayEntry(dest, content, mode_of(st), uid, gid))
        else:
            raise ScriptError(
                [Problem(f"overlay {base!r}", f"{child.path} is not a file, directory or symlink")]
            )
    return entries
