"""The tree `mke2fs -d -` makes of the stream of a plan (rfs.fs.plan), for rfs.fs.treediff.

The stream's fixes (rfs.fs.tarstream) are applied as the stream applies them, and mke2fs's
own rules: an inode takes the owner, mode and times of the last entry that names it (a hard
link's header included; atime and ctime only from PAX records, else 0; crtime is the build's
time), and of the `SCHILY.xattr.*` records only security.capability is kept (mke2fs 1.47
skips every other name). `region` tells which paths overlays can change, so an overlay edit
turns only those into trees, not the whole export.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from rfs.fs import tarformat as tf
from rfs.fs.ext4ops import Extent
from rfs.fs.plan import CONSOLE, Generated, Plan
from rfs.fs.selection import ancestors, decode, normalise
from rfs.fs.tarstream import ENGINE_ETC_FILES
from rfs.fs.treediff import Node, Tree, entry_bytes

# Only these SCHILY.xattr records reach the image.
KEPT_XATTRS = frozenset({"security.capability"})
_XATTR = b"SCHILY.xattr."
_KINDS = {
    tf.DIRECTORY: "dir",
    tf.SYMLINK: "symlink",
    tf.CHARDEV: "char",
    tf.BLOCKDEV: "block",
    tf.FIFO: "fifo",
    **dict.fromkeys(tf.REGULAR_TYPES, "file"),
}


class Header(NamedTuple):
    """What a tar header says about an entry beyond RawEntry: owner, mode, times, device (a
    tuple: the export's headers are kept pickled, and tuples load fastest)."""

    mode: int
    uid: int
    gid: int
    mtime: int
    atime: int
    ctime: int
    device: tuple[int, int]
    readable: bool = True


def read_headers(buf: tf.Buffer, entries: Sequence[tf.RawEntry]) -> list[Header]:
    """The Header of each entry of the archive held in `buf`; PAX records win over fields. An
    entry whose fields cannot be read gets a Header with `readable` False (its tree is then
    not told: the full route deals with it as it always has)."""
    found = []
    for entry in entries:
        block = bytes(buf[entry.header : entry.header + tf.BLOCK])
        pax = entry.pax or {}
        try:
            header = Header(
                mode=tf.parse_number(block[100:108]) & 0o7777,
                uid=_number(block, pax, b"uid", 108, 116),
                gid=_number(block, pax, b"gid", 116, 124),
                mtime=_number(block, pax, b"mtime", 136, 148),
                atime=_number(block, pax, b"atime", 0, 0),
                ctime=_number(block, pax, b"ctime", 0, 0),
                device=(_number(block, pax, b"", 329, 337), _number(block, pax, b"", 337, 345)),
            )
        except (ValueError, OverflowError, tf.TarError):
            header = Header(0, 0, 0, 0, 0, 0, (0, 0), readable=False)
        found.append(header)
    return found


def _number(block: bytes, pax: Mapping[bytes, bytes], key: bytes, start: int, end: int) -> int:
    if key in pax:  # PAX times may have a fraction: mke2fs keeps the seconds
        return int(float(pax[key]))
    return tf.parse_number(block[start:end]) if block[start:end].strip(b"\0 ") else 0


def _xattrs(entry: tf.RawEntry) -> dict[str, bytes]:
    found = {}
    for key, value in (entry.pax or {}).items():
        if key.startswith(_XATTR):
            name = key[len(_XATTR) :].decode("utf-8", "surrogateescape")
            if name in KEPT_XATTRS:
                found[name] = value
    return found


@dataclass
class _Inode:
    fields: dict[str, object]
    names: list[str] = field(default_factory=list)


def tree_of_plan(
    plan: Plan,
    headers: Sequence[Header],
    archive: Path | Locate,
    *,
    mtime: int,
    before_overlays: bool = False,
    only: Collection[str] | None = None,
) -> Tree | str:
    """The tree the stream of `plan` gives (as it stood before the overlays were laid out, with
    `before_overlays`), or the reason it cannot be told. `headers` are read_headers of the
    plan's entries, `archive` the file that holds them (or, for a layered export, where each
    offset lies: rfs.fs.layered), `mtime` the build's timestamp; with
    `only` (see region), the tree holds those paths alone."""
    keep = plan.keep_without_overlays if before_overlays else plan.keep
    generated = plan.generated
    if before_overlays:
        dropped = plan.dropped_without_overlays
        generated = [replace(g, dropped=d) for g, d in zip(generated, dropped, strict=False)]
    dir_meta = {g.path: g for g in generated if g.typeflag == tf.DIRECTORY and not g.dropped}
    inodes: dict[str, _Inode] = {}  # path -> its inode (shared by hard links)
    written_as: dict[str, str] = {}  # a left-out link target -> the link written as it

    def parents(path: str) -> None:
        for above in ancestors(path):
            if above not in inodes:
                meta = dir_meta.get(above)
                fields = {"kind": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime": mtime}
                if meta is not None:
                    fields |= {"mode": meta.mode, "uid": meta.uid, "gid": meta.gid}
                inodes[above] = _Inode(fields, [above])

    def add(path: str, fields: dict[str, object]) -> None:
        parents(path)
        inodes[path] = _Inode(fields, [path])

    for i, (entry, path) in enumerate(zip(plan.entries, plan.paths, strict=True)):
        if not path or not keep[i]:
            continue
        if only is not None and path not in only:
            if path[: path.rfind("/")] in only:
                parents(path)  # the stream writes a missing parent before this entry
            continue
        head = headers[i]
        if not head.readable:
            return f"the export entry {path} has a header field rfs cannot read"
        own: dict[str, object] = {
            "mode": head.mode,
            "uid": head.uid,
            "gid": head.gid,
            # mke2fs clamps an entry's times to SOURCE_DATE_EPOCH (the build's timestamp)
            "mtime": min(head.mtime, mtime),
            "atime": min(head.atime, mtime),
            "ctime": min(head.ctime, mtime),
        }
        if entry.typeflag == tf.HARDLINK:
            target = normalise(decode(entry.linkname))
            target = written_as.get(target, target)
            inode = inodes.get(target)
            if inode is not None and inode.fields["kind"] != "dir" and target in inode.names:
                parents(path)
                inode.fields |= own  # mke2fs sets the inode from each entry naming it
                inode.fields["xattrs"] = {**inode.fields["xattrs"], **_xattrs(entry)}  # type: ignore[dict-item]
                inode.names.append(path)
                inodes[path] = inode
                continue
            source = _link_source(plan, target)
            if source is None:
                return f"the hard link {path} has no target"
            j, found = source
            fields = _entry_fields(found, headers[j], archive, mtime)
            if isinstance(fields, str):
                return fields
            add(path, fields)  # written as the file itself (see rfs.fs.tarstream)
            written_as[target] = path
            continue
        kind = _KINDS.get(entry.typeflag)
        fields = _entry_fields(entry, head, archive, mtime)
        if isinstance(fields, str):
            return fields
        meta = dir_meta.get(path) if kind == "dir" else None
        if meta is not None:  # a directory laid over it: its owner, mode and time
            fields |= {"mode": meta.mode, "uid": meta.uid, "gid": meta.gid, "mtime": mtime}
            fields |= {"atime": 0, "ctime": 0}  # the merged entry has no such records
        elif path == CONSOLE and kind == "file" and entry.size == 0:
            fields = {"kind": "char", "mode": 0o600, "uid": 0, "gid": 0}
            fields["mtime"] = min(head.mtime, mtime)
            fields |= {"device": (5, 1)}
        elif path in plan.restore and kind == "file" and entry.size == 0:
            fields |= {"content": plan.restore[path], "mode": 0o644}
        elif path in ENGINE_ETC_FILES and kind == "file" and entry.size == 0:
            fields["mode"] = 0o644
        add(path, fields)
    for g in generated:
        if g.dropped or (g.typeflag == tf.DIRECTORY and g.path in inodes):
            continue
        if only is not None and g.path not in only:
            continue
        if g.path == "/":
            continue
        meta = dir_meta.get(g.path, g) if g.typeflag == tf.DIRECTORY else g
        add(g.path, _generated_fields(meta, mtime))
    return _tree(inodes)


def _link_source(plan: Plan, target: str) -> tuple[int, tf.RawEntry] | None:
    """The entry a hard link to a left-out `target` is written as (following link chains)."""
    for _ in range(40):
        found = plan.by_path.get(target)
        if found is None:
            return None
        if found.typeflag != tf.HARDLINK:
            return _index_of(plan, found), found
        target = normalise(decode(found.linkname))
    return None


# Where an offset of a layered export (rfs.fs.layered) lies: its archive and the offset in it.
Locate = Callable[[int], tuple[Path, int]]


def _extent(archive: Path | Locate, offset: int, size: int) -> Extent:
    if isinstance(archive, Path):
        return Extent(archive, offset, size)
    path, local = archive(offset)
    return Extent(path, local, size)


def _entry_fields(
    entry: tf.RawEntry, head: Header, archive: Path | Locate, epoch: int
) -> dict[str, object] | str:
    kind = _KINDS.get(entry.typeflag)
    if kind is None:
        return f"the export entry {decode(entry.name)!r} has the tar type {chr(entry.typeflag)!r}"
    if not head.readable:
        return f"the export entry {decode(entry.name)!r} has a header field rfs cannot read"
    return {
        "kind": kind,
        "mode": head.mode,
        "uid": head.uid,
        "gid": head.gid,
        "mtime": min(head.mtime, epoch),  # as mke2fs clamps them
        "atime": min(head.atime, epoch),
        "ctime": min(head.ctime, epoch),
        "content": _extent(archive, entry.data, entry.size) if kind == "file" else b"",
        "target": decode(entry.linkname) if kind == "symlink" else "",
        "device": head.device if kind in ("char", "block") else (0, 0),
        "xattrs": _xattrs(entry),
    }


def _generated_fields(g: Generated, mtime: int) -> dict[str, object]:
    kind = _KINDS[g.typeflag]
    return {
        "kind": kind,
        "mode": g.mode,
        "uid": g.uid,
        "gid": g.gid,
        "mtime": mtime,
        "content": g.content,
        "target": g.target,
        "device": g.device if kind in ("char", "block") else (0, 0),
    }


def _tree(inodes: Mapping[str, _Inode]) -> Tree:
    tree: Tree = {}
    for path, inode in inodes.items():
        fields = dict(inode.fields)
        xattrs = fields.pop("xattrs", {})
        assert isinstance(xattrs, dict)
        group = inode.names[0] if len(inode.names) > 1 else ""
        tree[path] = Node(path, xattrs=tuple(sorted(xattrs.items())), group=group, **fields)  # type: ignore[arg-type]
    return tree


def _index_of(plan: Plan, entry: tf.RawEntry) -> int:
    """The index of `entry` in the plan (by_path holds the last entry of each path)."""
    path = normalise(decode(entry.name))
    for i in range(len(plan.paths) - 1, -1, -1):
        if plan.paths[i] == path and plan.entries[i] is entry:
            return i
    raise ValueError(path)


def region(plan: Plan, extra: Collection[str] = ()) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """What the overlays of `plan` (and whatever else changed the `extra` paths: layer diffs)
    can change: the paths whose entries they drop or add (a directory's whole subtree is
    dropped entry by entry), every name of a hard-linked inode among them, and their
    ancestors. Also, per directory holding such a path, the bytes and the longest of its other
    entries (the same with and without the overlays), for diff_trees' `outside`."""
    touched = {g.path for g in plan.generated} | set(extra)
    kept_both: list[str] = []
    links: dict[str, str] = {}  # union-find over hard links: path -> a name of its inode
    for entry, path, before, after in zip(
        plan.entries, plan.paths, plan.keep_without_overlays, plan.keep, strict=True
    ):
        if not path:
            continue
        if before != after:
            touched.add(path)
        elif before:
            kept_both.append(path)
        if entry.typeflag == tf.HARDLINK and (before or after):
            links[_root(links, path)] = _root(links, normalise(decode(entry.linkname)))
    if links:
        members: dict[str, list[str]] = {}
        for path in list(links):
            members.setdefault(_root(links, path), []).append(path)
        for names in members.values():
            group = {*names, _root(links, names[0])}
            if not touched.isdisjoint(group):
                touched |= group
    for path in list(touched):
        touched.update(ancestors(path))
    parents = {os.path.dirname(p) for p in touched}
    outside: dict[str, tuple[int, int]] = {}
    for path in kept_both:
        if path in touched or path == "/":
            continue
        parent, name = os.path.split(path)
        if parent in parents:
            size, longest = outside.get(parent, (0, 0))
            rec = entry_bytes(name)
            outside[parent] = (size + rec, max(longest, rec))
    return touched, outside


def _root(links: dict[str, str], path: str) -> str:
    while links.get(path, path) != path:
        path = links[path]
    return path
