"""The tree an ext4 image holds, as `mke2fs -d -` makes it from rfs's stream, and the
difference between two such trees as debugfs operations (see rfs.fs.ext4patch).

A tree maps each path to a Node: what mke2fs gives the inode behind that path (kind, mode,
owner, mtime, content, symlink target, device, xattrs) and which names share it (`group`).
`tree_of_plan` turns a plan (rfs.fs.plan) into the tree its stream makes, with the stream's
fixes (rfs.fs.tarstream) and mke2fs's own rules: an inode takes the owner, mode and times of
the last entry that names it (a hard link's header included; atime and ctime only from PAX
records, else 0; crtime is the build's time), and of
the `SCHILY.xattr.*` records only security.capability is kept (mke2fs ignores the others).
`diff_trees(before, after)` gives the Patch that turns the first tree into the second, or
the reason it cannot be written exactly; its order depends only on the paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rfs.fs import tarformat as tf
from rfs.fs.ext4ops import (
    AddName,
    Fields,
    Links,
    MakeDir,
    MakeNode,
    Op,
    Patch,
    Remove,
    RemoveDir,
    RemoveXattr,
    SetXattr,
    Symlink,
    Write,
    unsafe,
)
from rfs.fs.plan import CONSOLE, Generated, Plan
from rfs.fs.selection import ancestors, decode, normalise

# Only these SCHILY.xattr records reach the image: mke2fs (1.47) skips every other name.
KEPT_XATTRS = frozenset({"security.capability"})
_XATTR = b"SCHILY.xattr."
ENGINE_ETC_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_KINDS = {
    tf.DIRECTORY: "dir",
    tf.SYMLINK: "symlink",
    tf.CHARDEV: "char",
    tf.BLOCKDEV: "block",
    tf.FIFO: "fifo",
    **dict.fromkeys(tf.REGULAR_TYPES, "file"),
}
# The room for entries in a directory block: 4096 less the checksum tail (metadata_csum). An
# entry takes 8 bytes and its name, 4-aligned; "." and ".." take 24 in the first block.
_DIR_BLOCK = 4096 - 12


@dataclass(frozen=True)
class Extent:
    """File content that sits in a file (an archive's member data): `size` bytes at `offset`."""

    file: Path
    offset: int
    size: int

    def read(self) -> bytes:
        """The content."""
        with self.file.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


Content = bytes | Extent


@dataclass(frozen=True)
class Node:
    """One path of the image and the inode behind it, as mke2fs makes it from the stream."""

    path: str
    kind: str  # "file", "dir", "symlink", "char", "block" or "fifo"
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    atime: int = 0  # mke2fs takes atime and ctime from PAX records (0 without)
    ctime: int = 0
    content: Content = b""
    target: str = ""  # symlink target
    device: tuple[int, int] = (0, 0)  # major, minor
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name
    group: str = ""  # hard links: the first name of the inode ("" for a single name)


Tree = dict[str, Node]


@dataclass(frozen=True)
class Header:
    """What a tar header says about an entry beyond RawEntry: owner, mode, time, device."""

    mode: int
    uid: int
    gid: int
    mtime: int
    atime: int
    ctime: int
    device: tuple[int, int]


def read_headers(buf: tf.Buffer, entries: Sequence[tf.RawEntry]) -> list[Header]:
    """The Header of each entry of the archive held in `buf`; PAX records win over fields."""
    found = []
    for entry in entries:
        block = bytes(buf[entry.header : entry.header + tf.BLOCK])
        pax = entry.pax or {}
        found.append(
            Header(
                mode=tf.parse_number(block[100:108]) & 0o7777,
                uid=_number(block, pax, b"uid", 108, 116),
                gid=_number(block, pax, b"gid", 116, 124),
                mtime=_number(block, pax, b"mtime", 136, 148),
                atime=int(float(pax.get(b"atime", b"0"))),
                ctime=int(float(pax.get(b"ctime", b"0"))),
                device=(_number(block, pax, b"", 329, 337), _number(block, pax, b"", 337, 345)),
            )
        )
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
    archive: Path,
    *,
    mtime: int,
    before_overlays: bool = False,
) -> Tree | str:
    """The tree the stream of `plan` gives (as it stood before the overlays were laid out, with
    `before_overlays`), or the reason it cannot be told. `headers` are read_headers of the
    plan's entries, `archive` the file that holds them, `mtime` the build's timestamp."""
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
        head = headers[i]
        own: dict[str, object] = {
            "mode": head.mode,
            "uid": head.uid,
            "gid": head.gid,
            "mtime": head.mtime,
            "atime": head.atime,
            "ctime": head.ctime,
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
            fields = _entry_fields(found, headers[j], archive)
            if isinstance(fields, str):
                return fields
            add(path, fields)  # written as the file itself (see rfs.fs.tarstream)
            written_as[target] = path
            continue
        kind = _KINDS.get(entry.typeflag)
        fields = _entry_fields(entry, head, archive)
        if isinstance(fields, str):
            return fields
        meta = dir_meta.get(path) if kind == "dir" else None
        if meta is not None:  # a directory laid over it: its owner, mode and time
            fields |= {"mode": meta.mode, "uid": meta.uid, "gid": meta.gid, "mtime": mtime}
            fields |= {"atime": 0, "ctime": 0}  # the merged entry has no such records
        elif path == CONSOLE and kind == "file" and entry.size == 0:
            fields = {"kind": "char", "mode": 0o600, "uid": 0, "gid": 0, "mtime": head.mtime}
            fields |= {"device": (5, 1)}
        elif path in plan.restore and kind == "file" and entry.size == 0:
            fields |= {"content": plan.restore[path], "mode": 0o644}
        elif path in ENGINE_ETC_FILES and kind == "file" and entry.size == 0:
            fields["mode"] = 0o644
        add(path, fields)
    for g in generated:
        if g.dropped or (g.typeflag == tf.DIRECTORY and g.path in inodes):
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
            return plan.entries.index(found), found
        target = normalise(decode(found.linkname))
    return None


def _entry_fields(entry: tf.RawEntry, head: Header, archive: Path) -> dict[str, object] | str:
    kind = _KINDS.get(entry.typeflag)
    if kind is None:
        return f"the export entry {decode(entry.name)!r} has the tar type {chr(entry.typeflag)!r}"
    return {
        "kind": kind,
        "mode": head.mode,
        "uid": head.uid,
        "gid": head.gid,
        "mtime": head.mtime,
        "atime": head.atime,
        "ctime": head.ctime,
        "content": Extent(archive, entry.data, entry.size) if kind == "file" else b"",
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


def _same_content(a: Content, b: Content) -> bool:
    if a == b:
        return True
    size_a = a.size if isinstance(a, Extent) else len(a)
    size_b = b.size if isinstance(b, Extent) else len(b)
    if size_a != size_b:
        return False
    data_a = a.read() if isinstance(a, Extent) else a
    data_b = b.read() if isinstance(b, Extent) else b
    return data_a == data_b


def _same_inode(a: Node, b: Node) -> bool:
    """Whether `b` can be `a`'s inode with at most its owner, mode, time or xattrs changed."""
    if a.kind != b.kind:
        return False
    if a.kind == "dir":
        return True
    return a.target == b.target and a.device == b.device and _same_content(a.content, b.content)


def _groups(tree: Tree) -> dict[str, list[str]]:
    """Each path's inode as the sorted list of its names (non-directories only)."""
    by_key: dict[str, list[str]] = {}
    for path in sorted(tree):
        node = tree[path]
        if node.kind != "dir":
            by_key.setdefault(node.group or path, []).append(path)
    return {path: names for names in by_key.values() for path in names}


def diff_trees(before: Tree, after: Tree, *, missing_includes: Sequence[str] = ()) -> Patch | str:
    """The Patch that turns the image of `before` into the image of `after` (both trees as
    tree_of_plan gives them), or the reason it cannot be written exactly. The operations
    follow the sorted paths, so the same trees always give the same script."""
    for path in sorted(after):
        parent = os.path.dirname(path)
        if path == "/" or parent == "/":
            continue
        if parent not in after:
            return f"{path} has no parent directory in the tree"
        if after[parent].kind != "dir":
            return f"{parent} is in the way of {path}"
    names_before, names_after = _groups(before), _groups(after)
    gone = _gone(before, after)
    kept = _kept_inodes(names_before, names_after, gone)
    problem = _directory_sizes(before, after, gone)
    if problem:
        return problem
    patch = Patch(missing_includes=list(missing_includes))
    ops = patch.ops
    for path in sorted(gone, reverse=True):  # children before their directory
        ops.append(RemoveDir(path) if before[path].kind == "dir" else Remove(path))
    created: dict[str, str] = {}  # first name of a new inode -> the name it was written as
    for path in sorted(after):
        node = after[path]
        if path in before and path not in gone:
            if node.kind == "dir" or kept.get(names_after[path][0]) == path:
                _update(ops, before[path], node)  # once per inode: on the name it keeps
            continue
        if path == "/":
            continue  # the root is always there; without an entry its fields are mke2fs's
        first = names_after[path][0] if node.kind != "dir" else path
        source = kept.get(first) or created.get(first)
        if source is not None:
            ops.append(AddName(path, source))
            continue
        if node.kind != "dir":
            created[first] = path
        ops.extend(_create(node))
    for first in sorted(set(kept) | set(created)):
        names = names_after[first]
        keeper = kept.get(first)
        if keeper is None:
            if len(names) > 1:
                ops.append(Links(created[first], len(names)))
        elif names != names_before[keeper]:  # `rm` dropped the count, `ln` did not raise it
            ops.append(Links(keeper, len(names)))
    for op in ops:
        for text in op.names():
            if unsafe(text):
                return f"debugfs cannot be given the name {text!r}"
    return patch


def _gone(before: Tree, after: Tree) -> set[str]:
    """The paths of `before` whose inode cannot stay: gone, another kind or other content
    (a directory takes its whole subtree)."""
    gone: set[str] = set()
    for path in sorted(before):
        if path == "/" or path in gone:
            continue
        if path not in after or not _same_inode(before[path], after[path]):
            gone.add(path)
            if before[path].kind == "dir":
                prefix = path + "/"
                gone.update(p for p in before if p.startswith(prefix))
    return gone


def _kept_inodes(
    names_before: Mapping[str, list[str]], names_after: Mapping[str, list[str]], gone: set[str]
) -> dict[str, str]:
    """Which inode of `before` each inode of `after` keeps, as {first name in after: a name
    of the kept inode that stays}; adds to `gone` the names an inode loses and the names of
    inodes nobody keeps (a name that joins or leaves a hard-link group is written again)."""
    kept: dict[str, str] = {}
    claimed: set[str] = set()  # first names (in before) of the inodes kept
    for path in sorted(names_after):
        names = names_after[path]
        if path != names[0]:
            continue
        for name in names:
            if name in names_before and name not in gone and names_before[name][0] not in claimed:
                claimed.add(names_before[name][0])
                kept[path] = name
                break
    for first, keeper in kept.items():
        wanted = set(names_after[first])
        gone.update(n for n in names_before[keeper] if n not in wanted)
    gone.update(p for p, names in names_before.items() if names[0] not in claimed)
    return kept


def _directory_sizes(before: Tree, after: Tree, gone: set[str]) -> str | None:
    """Why a directory could end up with another number of blocks than in the full route, if
    it could. Both routes fill directory blocks first-fit (a block wastes less than the
    longest entry), but debugfs never shrinks a directory and may not reuse the room removed
    names leave: unless the block count is certain both ways, the full route is taken."""
    sizes: dict[str, list[int]] = {}  # dir -> [bytes before, bytes after, removed, added, max]
    for tree, column in ((before, 0), (after, 1)):
        for path in tree:
            if path == "/":
                continue
            parent, name = os.path.split(path)
            rec = 8 + ((len(name.encode("utf-8", "surrogateescape")) + 3) & ~3)
            row = sizes.setdefault(parent, [0, 0, 0, 0, 20])
            row[column] += rec
            row[4] = max(row[4], rec)
            if column == 0 and (path in gone or path not in after):
                row[2] += rec
            elif column == 1 and (path in gone or path not in before):
                row[3] += rec
    for path in sorted(sizes):
        if path in gone or path not in after:
            continue
        bytes_before, bytes_after, removed, added, longest = sizes[path]
        if path == "/":
            bytes_before, bytes_after = bytes_before + 20, bytes_after + 20  # lost+found

        def blocks(size: int, waste: int) -> int:
            return -(-(size + 24) // (_DIR_BLOCK - waste))  # "." and ".." in the first

        low, high = blocks(bytes_after, 0), blocks(bytes_after, longest)
        if low != high:
            return f"the directory {path} may take another number of blocks"
        if not removed or (path not in before and not before_has_dir(before, path)):
            continue
        if blocks(bytes_before, 0) != low or blocks(bytes_before, longest) != low:
            return f"the directory {path} would shrink"
        if added and low * _DIR_BLOCK - 24 - bytes_before - added < low * longest:
            return f"the directory {path} may not find room for its new names"
    return None


def before_has_dir(before: Tree, path: str) -> bool:
    """Whether `before` holds the directory `path` (the root always)."""
    return path == "/" or (path in before and before[path].kind == "dir")


def _fields(node: Node) -> Fields:
    return Fields(
        node.path, node.kind, node.mode, node.uid, node.gid, node.mtime, node.atime, node.ctime
    )


def _create(node: Node) -> list[Op]:
    ops: list[Op] = []
    if node.kind == "dir":
        ops.append(MakeDir(node.path))
    elif node.kind == "file":
        ops.append(Write(node.path, node.content))
    elif node.kind == "symlink":
        ops.append(Symlink(node.path, node.target))
    else:
        ops.append(MakeNode(node.path, node.kind, node.device))
    ops.append(replace(_fields(node), new=True))
    ops.extend(SetXattr(node.path, name, value) for name, value in node.xattrs)
    return ops


def _update(ops: list[Op], old: Node, new: Node) -> None:
    """Set what changed of an inode that stays (once per inode: on its first name)."""
    if _fields(old) != replace(_fields(new), path=old.path):
        ops.append(_fields(new))
    before, after = dict(old.xattrs), dict(new.xattrs)
    ops.extend(RemoveXattr(new.path, name) for name in sorted(before) if name not in after)
    ops.extend(
        SetXattr(new.path, name, value)
        for name, value in sorted(after.items())
        if before.get(name) != value
    )
