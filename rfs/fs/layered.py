"""An export with layer diffs on top (#16): one list of entries, as if the container had been
exported after the last layer, without exporting it.

The export and each layer (a normalised OCI layer tarball, rfs.engine.layerdiff) are mapped
side by side in one address space (`Segments`), so every entry keeps pointing at its own bytes
and the stream writer copies them as it copies an export's. `apply_layers` gives the entries
the later export would hold, in an order the stream can take (parents first):

- a layer's entry at a path the tree already holds takes that entry's place (a directory
  over a directory keeps what is below it; anything else drops it);
- a new path is appended (a layer lists parents before children);
- `DIR/.wh.NAME` removes NAME and what is below it; `DIR/.wh..wh..opq` removes what the
  layers below put under DIR.

What the list cannot say exactly raises `Unlayerable`, and the caller exports the container
instead: a change that touches a hard link of the tree below (overlayfs copy-up breaks a link
the tar form cannot show), a layer's hard link to a file it does not hold, an entry below a
path that is not a directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rfs.fs import tarformat as tf
from rfs.fs.selection import decode, normalise

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Room between two archives in the address space: an entry's span never runs into the next.
_GAP = tf.BLOCK


class Unlayerable(Exception):
    """The layers cannot be laid onto the export exactly; export the container instead."""


class Segments:
    """Archives laid end to end in one address space: slicing reads the archive a range lies
    in. A range never spans two archives (entries do not)."""

    def __init__(self, parts: Sequence[tuple[tf.Buffer, int | None]]) -> None:
        self.parts = [(memoryview(buf).cast("B"), fd) for buf, fd in parts]
        self.bases = bases([len(view) for view, _ in self.parts])

    def locate(self, offset: int) -> int:
        """The index of the archive that holds `offset`."""
        for i in range(len(self.bases) - 1, -1, -1):
            if offset >= self.bases[i]:
                return i
        raise IndexError(offset)

    def __getitem__(self, where: slice) -> memoryview:
        start, stop = int(where.start or 0), int(where.stop)
        i = self.locate(start)
        base = self.bases[i]
        view = self.parts[i][0]
        if stop - base > len(view):
            raise tf.TarError("a range of the layered export runs past its archive")
        return view[start - base : stop - base]

    def release(self) -> None:
        """Let the archives' buffers go (a mmap cannot close while views of it exist)."""
        for view, _ in self.parts:
            view.release()


def bases(sizes: Sequence[int]) -> list[int]:
    """Where archives of `sizes` bytes start in a Segments address space."""
    found, base = [], 0
    for size in sizes:
        found.append(base)
        base += size + _GAP
    return found


def shifted(entries: list[tf.RawEntry], base: int) -> list[tf.RawEntry]:
    """`entries` of an archive placed at `base` in a Segments address space."""
    if not base:
        return entries
    return [
        dataclasses.replace(
            e, start=e.start + base, header=e.header + base, data=e.data + base, end=e.end + base
        )
        for e in entries
    ]


def _path(entry: tf.RawEntry) -> str:
    text = decode(entry.name)
    if ".." in text.split("/"):
        raise tf.TarError(f"a layer holds an unsafe path {text!r}")
    return normalise(text)


class _Tree:
    """The entries so far, by path, in stream order (None where one was removed)."""

    def __init__(self, entries: list[tf.RawEntry]) -> None:
        self.slots: list[tf.RawEntry | None] = list(entries)
        self.at: dict[str, list[int]] = {}
        self.children: dict[str, set[str]] = {}
        self.linked: set[str] = set()  # paths that are hard links or their targets
        for i, entry in enumerate(entries):
            if entry.typeflag == tf.PAX_GLOBAL:
                continue
            self._index(_path(entry), i, entry)

    def _index(self, path: str, i: int, entry: tf.RawEntry) -> None:
        self.at.setdefault(path, []).append(i)
        parent = path.rpartition("/")[0] or "/"
        if path != "/":
            self.children.setdefault(parent, set()).add(path)
        if entry.typeflag == tf.HARDLINK:
            self.linked.add(path)
            self.linked.add(normalise(decode(entry.linkname)))

    def kind(self, path: str) -> int | None:
        slots = self.at.get(path)
        if not slots:
            return None
        entry = self.slots[slots[-1]]
        return None if entry is None else entry.typeflag

    def remove(self, path: str, *, below_only: bool = False) -> None:
        """Remove `path` (unless `below_only`) and everything below it."""
        todo = [path]
        while todo:
            cur = todo.pop()
            if cur != path or not below_only:
                if cur in self.linked:
                    raise Unlayerable(f"a layer removes or replaces {cur}, which is hard-linked")
                for i in self.at.pop(cur, []):
                    self.slots[i] = None
                parent = cur.rpartition("/")[0] or "/"
                self.children.get(parent, set()).discard(cur)
            todo.extend(self.children.pop(cur, set()))

    def put(self, path: str, entry: tf.RawEntry) -> None:
        """Put a layer's entry at `path`: in the place of what is there, else at the end."""
        existing = self.kind(path)
        if existing is not None:
            if path in self.linked:
                raise Unlayerable(f"a layer replaces {path}, which is hard-linked")
            keep_below = existing == tf.DIRECTORY and entry.typeflag == tf.DIRECTORY
            if not keep_below:
                self.remove(path, below_only=True)
            place = self.at[path][-1]
            for i in self.at[path][:-1]:
                self.slots[i] = None
            self.at[path] = [place]
            self.slots[place] = entry
            if entry.typeflag == tf.HARDLINK:
                self._index_link(path, entry)
            return
        parent = path.rpartition("/")[0] or "/"
        if parent != "/" and self.kind(parent) not in (tf.DIRECTORY, None):
            raise Unlayerable(f"a layer puts {path} below {parent}, which is not a directory")
        self.slots.append(entry)
        self._index(path, len(self.slots) - 1, entry)

    def _index_link(self, path: str, entry: tf.RawEntry) -> None:
        self.linked.add(path)
        self.linked.add(normalise(decode(entry.linkname)))


def apply_layers(
    export: list[tf.RawEntry], layers: Sequence[list[tf.RawEntry]]
) -> list[tf.RawEntry]:
    """The entries of the export with `layers` laid on it in order (see the module doc). All
    entries must already be placed in one Segments address space (`shifted`)."""
    tree = _Tree(export)
    for layer in layers:
        entries = [(e, _path(e)) for e in layer if e.typeflag != tf.PAX_GLOBAL]
        # Whiteouts and opaque markers hide what the layers below hold, never the layer's
        # own entries: apply them all first.
        for _, path in entries:
            parent, _, base = path.rpartition("/")
            parent = parent or "/"
            if base == OPAQUE:
                if tree.kind(parent) is not None:
                    tree.remove(parent, below_only=True)
            elif base.startswith(WHITEOUT):
                gone = parent.rstrip("/") + "/" + base[len(WHITEOUT) :]
                if tree.kind(gone) is not None:
                    tree.remove(gone)
        own: set[str] = set()
        for entry, path in entries:
            if path.rpartition("/")[2].startswith(WHITEOUT):
                continue
            if entry.typeflag == tf.HARDLINK:
                target = normalise(decode(entry.linkname))
                if target not in own:
                    raise Unlayerable(f"a layer links {path} to {target}, which it does not hold")
            tree.put(path, entry)
            own.add(path)
    return [entry for entry in tree.slots if entry is not None]
