"""The tree an ext4 image holds and the difference between two such trees as debugfs
operations (see rfs.fs.ext4patch).

A tree maps each path to a Node: what `mke2fs -d -` gives the inode behind that path (kind,
mode, owner, times, content, symlink target, device, xattrs) and which names share it
(`group`); rfs.fs.plantree makes the tree of a plan's stream. `diff_trees(before, after)`
gives the Patch that turns the image of the first tree into the image of the second, or the
reason it cannot be written exactly; its order depends only on the paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from rfs.fs.ext4ops import (
    AddName,
    Content,
    Extent,
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

# The room for entries in a directory block: 4096 less the checksum tail (metadata_csum). An
# entry takes 8 bytes and its name, 4-aligned; "." and ".." take 24 in the first block.
_DIR_BLOCK = 4096 - 12


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


def _same_content(a: Content, b: Content) -> bool:
    if a == b:
        return True
    size = a.size if isinstance(a, Extent) else len(a)
    if size != (b.size if isinstance(b, Extent) else len(b)):
        return False
    with contextlib.ExitStack() as stack:
        chunks = [stack.enter_context(_chunks(c)) for c in (a, b)]
        return all(x == y for x, y in zip(*chunks, strict=True))


_CHUNK = 1 << 20


@contextlib.contextmanager
def _chunks(content: Content) -> Iterator[Iterator[bytes]]:
    """The content in pieces of _CHUNK bytes (a big file is never read whole)."""
    if isinstance(content, bytes):
        yield (content[i : i + _CHUNK] for i in range(0, len(content), _CHUNK))
        return
    with content.file.open("rb") as f:
        f.seek(content.offset)
        sizes = [min(_CHUNK, content.size - i) for i in range(0, content.size, _CHUNK)]
        yield (f.read(n) for n in sizes)


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


def diff_trees(
    before: Tree,
    after: Tree,
    *,
    missing_includes: Sequence[str] = (),
    outside: Mapping[str, tuple[int, int]] | None = None,
) -> Patch | str:
    """The Patch that turns the image of `before` into the image of `after`, or the reason it
    cannot be written exactly. The operations follow the sorted paths, so the same trees
    always give the same script. The trees may leave out what is the same in both (see
    rfs.fs.plantree.region), but never one name of a hard-linked inode and not the other,
    nor an ancestor of a path they hold; `outside` then gives, per directory, the bytes and
    the longest of the entries left out (see _directory_sizes)."""
    for path in sorted(after):
        parent = os.path.dirname(path)
        if path == "/" or parent == "/":
            continue
        if parent not in after:
            return f"{path} has no parent directory in the tree"
        if after[parent].kind != "dir":
            return f"{parent} is in the way of {path}"
    if ("/" in before) != ("/" in after):  # mke2fs's own root (the epoch's times) on one side
        return "only one of the trees has an entry for the root"
    names_before, names_after = _groups(before), _groups(after)
    gone = _gone(before, after)
    kept = _kept_inodes(names_before, names_after, gone)
    problem = _directory_sizes(before, after, gone, outside or {})
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


def entry_bytes(name: str) -> int:
    """The bytes a directory entry for `name` takes: 8 and the name, 4-aligned."""
    return 8 + ((len(name.encode("utf-8", "surrogateescape")) + 3) & ~3)


def _directory_sizes(
    before: Tree, after: Tree, gone: set[str], outside: Mapping[str, tuple[int, int]]
) -> str | None:
    """Why a directory could end up with another number of blocks than in the full route, if
    it could. Both routes fill directory blocks first-fit (a block wastes less than the
    longest entry), but debugfs never shrinks a directory and may not reuse the room removed
    names leave: unless the block count is certain both ways, the full route is taken.
    `outside`: per directory, the bytes and the longest of entries the trees leave out."""
    sizes: dict[str, list[int]] = {}  # dir -> [bytes before, bytes after, removed, added, max]
    for tree, column in ((before, 0), (after, 1)):
        for path in tree:
            if path == "/":
                continue
            parent, name = os.path.split(path)
            rec = entry_bytes(name)
            extra, longest = outside.get(parent, (0, 0))
            row = sizes.setdefault(parent, [extra, extra, 0, 0, max(20, longest)])
            row[column] += rec
            row[4] = max(row[4], rec)
            if column == 0 and (path in gone or path not in after):
                row[2] += rec
            elif column == 1 and (path in gone or path not in before):
                row[3] += rec
    for path in sorted(sizes):
        bytes_before, bytes_after, removed, added, longest = sizes[path]
        if path in gone or (path not in after and path != "/") or not (removed or added):
            continue
        if path == "/":
            bytes_before, bytes_after = bytes_before + 20, bytes_after + 20  # lost+found

        def blocks(size: int, waste: int) -> int:
            return -(-(size + 24) // (_DIR_BLOCK - waste))  # "." and ".." in the first

        low, high = blocks(bytes_after, 0), blocks(bytes_after, longest)
        if low != high:
            return f"the directory {path} may take another number of blocks"
        if not removed or not before_has_dir(before, path):
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
