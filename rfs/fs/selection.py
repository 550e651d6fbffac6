"""Which paths of an export to keep: normalised paths, includes, exclude globs, symlinks.

Paths are `str` with undecodable bytes kept as surrogates (`surrogateescape`), so a name that is
not UTF-8 survives a round trip back to the exact bytes the archive held.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rfs.errors import Problem, ScriptError

# The reserved mountpoint that delivers scripts into build containers, and Docker's marker.
RESERVED = "/.rfs"
DROPPED_FILES = frozenset({"/.dockerenv"})
_MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS


@dataclass(frozen=True)
class Selection:
    """What to keep from the export. include_* empty AND whole=True means the whole filesystem."""

    whole: bool = True
    include_files: tuple[str, ...] = ()  # absolute paths; a file (or a dir: its whole subtree)
    include_dirs: tuple[str, ...] = ()  # absolute paths; the dir and its whole subtree
    create_files: tuple[str, ...] = ()  # empty files created (mode 0644 root) if absent
    create_dirs: tuple[str, ...] = ()  # empty dirs created (0755; /tmp, /var/tmp 1777) if absent
    exclude: tuple[str, ...] = ()  # fnmatch globs on absolute paths; drops the subtree too

    @property
    def everything(self) -> bool:
        """True when the whole export is kept (before excludes)."""
        return self.whole and not self.include_files and not self.include_dirs


def decode(raw: bytes) -> str:
    """Turn archive name bytes into a str that encodes back to the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


def encode(path: str) -> bytes:
    """Inverse of `decode`."""
    return path.encode("utf-8", "surrogateescape")


def components(path: str) -> list[str]:
    """Split a path into its names, dropping empty and '.' components."""
    return [part for part in path.split("/") if part and part != "."]


def normalise(name: str) -> str:
    """Return the absolute form of an archive name: "./etc/x/" and "etc/x" give "/etc/x"."""
    if name and name[0] not in "./" and name[-1] != "/" and "//" not in name and "/." not in name:
        return "/" + name  # the usual export name, already clean
    return "/" + "/".join(components(name))


def parent(path: str) -> str:
    """Return the parent of a normalised absolute path ("/" for top-level names)."""
    return path.rsplit("/", 1)[0] or "/"


def ancestors(path: str) -> Iterator[str]:
    """Yield the proper ancestors of a normalised path, outermost first, without "/"."""
    parts = components(path)
    for depth in range(1, len(parts)):
        yield "/" + "/".join(parts[:depth])


def check_destination(path: str, what: str) -> str:
    """Validate a path inside the image given by the user and return its normalised form."""
    problem = None
    if not path.startswith("/"):
        problem = "must be an absolute path inside the image"
    elif ".." in path.split("/"):
        problem = "must not contain '..'"
    elif "\x00" in path:
        problem = "must not contain a NUL character"
    if problem is not None:
        raise ScriptError([Problem(what, f"{path!r} {problem}")])
    return normalise(path)


# A lookup answers, for a normalised path, whether it is a symlink and where it points.
SymlinkLookup = Callable[[str], str | None]


def resolve(
    path: str, symlink_target: SymlinkLookup, *, follow_last: bool
) -> tuple[str, list[str]]:
    """Resolve symlinks in `path` the way the kernel would inside the image.

    Returns the resolved path and the symlinks passed through on the way. The last component is
    followed only if `follow_last`. A loop stops resolution and keeps the path reached so far.
    """
    todo = deque(components(path))
    done: list[str] = []
    passed: list[str] = []
    while todo:
        name = todo.popleft()
        if name == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + "/".join([*done, name])
        target = symlink_target(candidate) if (todo or follow_last) else None
        if target is None or len(passed) >= _MAX_SYMLINK_HOPS:
            done.append(name)
            continue
        passed.append(candidate)
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed(components(target)))
    return "/" + "/".join(done), passed


class Matcher:
    """Decides, path by path, what the selection keeps; memoises per directory."""

    def __init__(self, selection: Selection, symlink_target: SymlinkLookup) -> None:
        self.everything = selection.everything
        self.subtrees: set[str] = set()  # kept with everything below them
        self.exact: set[str] = set()  # kept themselves (parents, symlinks on the way)
        self.requested: list[str] = []
        for raw in (*selection.include_files, *selection.include_dirs):
            path = check_destination(raw, "export include")
            self.requested.append(path)
            resolved, passed = resolve(path, symlink_target, follow_last=False)
            self.subtrees.add(resolved)
            self.exact.update(passed)
            if symlink_target(resolved) is not None:
                # A symlink alone would dangle in the image: keep what it points to as well.
                target, more = resolve(resolved, symlink_target, follow_last=True)
                self.subtrees.add(target)
                self.exact.update(more)
        for path in [*self.subtrees, *self.exact]:
            self.exact.update(ancestors(path))
        patterns = [p.rstrip("/") or "/" for p in selection.exclude]
        self._exclude = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            if patterns
            else None
        )
        self._excluded_dirs: dict[str, bool] = {"/": False}
        self._in_subtree: dict[str, bool] = {"/": "/" in self.subtrees}

    def excluded(self, path: str) -> bool:
        """True if `path` or one of its ancestors is dropped by an exclude glob or a fixed rule."""
        if path in DROPPED_FILES:
            return True
        return self._excluded_dir(path)

    def _excluded_dir(self, path: str) -> bool:
        known = self._excluded_dirs.get(path)
        if known is not None:
            return known
        verdict = (
            path == RESERVED
            or (self._exclude is not None and self._exclude.match(path) is not None)
            or self._excluded_dir(parent(path))
        )
        self._excluded_dirs[path] = verdict
        return verdict

    def _subtree(self, path: str) -> bool:
        known = self._in_subtree.get(path)
        if known is not None:
            return known
        verdict = path in self.subtrees or self._subtree(parent(path))
        self._in_subtree[path] = verdict
        return verdict

    def keeps(self, path: str) -> bool:
        """True if the selection keeps `path` from the export (its root entry always)."""
        if path == "/":
            return True
        if self.excluded(path):
            return False
        return self.everything or path in self.exact or self._subtree(path)
