"""tree_of_plan: the tree the stream of a plan makes (hard links, the stream's fixes, the
xattrs and times mke2fs keeps); region: what overlays can change."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path
from typing import Any

from rfs.fs import tarformat as tf
from rfs.fs.ext4ops import Links, Patch, Remove
from rfs.fs.overlay import OverlayEntry
from rfs.fs.plan import make_plan
from rfs.fs.plantree import read_headers, region, tree_of_plan
from rfs.fs.selection import Selection
from rfs.fs.treediff import Node, Tree, diff_trees

EPOCH = 1_700_000_000


def _ok(before: Tree, after: Tree) -> Patch:
    patch = diff_trees(before, after)
    assert not isinstance(patch, str), patch
    return patch


def _archive(tmp_path: Path, *members: tuple[str, bytes, dict[str, Any]]) -> Path:
    path = tmp_path / "export.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, fields in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            data = fields.pop("data", b"")
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _tree_of(path: Path, overlays: tuple[OverlayEntry, ...] = (), **kw: Any) -> Tree:
    entries = tf.index_archive(path.read_bytes())
    plan = make_plan(entries, Selection(), overlays, kw.pop("restore", {}))
    tree = tree_of_plan(plan, read_headers(path.read_bytes(), entries), path, mtime=EPOCH, **kw)
    assert not isinstance(tree, str), tree
    return tree


def test_tree_of_plan_follows_mke2fs(tmp_path: Path) -> None:
    cap = "\x01\x00\x00\x02"
    path = _archive(
        tmp_path,
        ("etc/tool", tarfile.REGTYPE, {"data": b"t", "mode": 0o755, "uid": 1, "mtime": 10}),
        ("etc/tool2", tarfile.LNKTYPE, {"linkname": "etc/tool", "mode": 0o700, "mtime": 20}),
        (
            "etc/ping",
            tarfile.REGTYPE,
            {
                "pax_headers": {
                    "SCHILY.xattr.security.capability": cap,
                    "SCHILY.xattr.user.x": "y",
                    "atime": "7.5",
                }
            },
        ),
        ("dev/console", tarfile.REGTYPE, {"mode": 0o644}),
        ("etc/hostname", tarfile.REGTYPE, {"mode": 0o755}),
        ("etc/hosts", tarfile.REGTYPE, {"mode": 0o755}),
        ("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 300}),
    )
    tree = _tree_of(path, restore={"/etc/hostname": b"vm\n"})
    assert tree["/etc"] == Node("/etc", "dir", 0o755, mtime=EPOCH)  # a missing parent
    tool, tool2 = tree["/etc/tool"], tree["/etc/tool2"]
    assert (tool.mode, tool.uid, tool.mtime, tool.group) == (0o700, 0, 20, "/etc/tool")
    assert tool2 == dataclasses.replace(tool, path="/etc/tool2")
    assert tree["/etc/ping"].xattrs == (("security.capability", cap.encode("latin-1")),)
    assert tree["/etc/ping"].atime == 7
    assert tree["/dev/console"] == Node("/dev/console", "char", 0o600, device=(5, 1))
    assert tree["/etc/hostname"].content == b"vm\n" and tree["/etc/hostname"].mode == 0o644
    assert tree["/etc/hosts"].mode == 0o644
    assert tree["/dev/sda"].device == (8, 300)


def test_trees_before_and_after_overlays(tmp_path: Path) -> None:
    path = _archive(
        tmp_path,
        ("srv", tarfile.DIRTYPE, {"mode": 0o700, "uid": 5}),
        ("srv/a", tarfile.REGTYPE, {"data": b"a"}),
        ("srv/b", tarfile.LNKTYPE, {"linkname": "srv/a"}),
        ("srv/c", tarfile.LNKTYPE, {"linkname": "srv/a"}),
    )
    overlays = (
        OverlayEntry("/srv", None, 0o750, 1, 2, is_dir=True),
        OverlayEntry("/srv/a", b"new", 0o644, 0, 0),
    )
    before = _tree_of(path, overlays, before_overlays=True)
    after = _tree_of(path, overlays)
    assert before["/srv"].mode == 0o700 and after["/srv"].mode == 0o750
    assert before["/srv/b"].group == "/srv/a"
    assert after["/srv/b"].group == after["/srv/c"].group == "/srv/b"  # written as the file
    assert after["/srv/a"].content == b"new" and not after["/srv/a"].group
    ops = _ok(before, after).ops
    assert ops[0] == Remove("/srv/a")
    assert Links("/srv/b", 2) in ops


def test_the_region_holds_what_overlays_change_and_what_it_needs(tmp_path: Path) -> None:
    members: list[tuple[str, bytes, dict[str, Any]]] = [("srv", tarfile.DIRTYPE, {})]
    members += [("srv/a", tarfile.REGTYPE, {"data": b"a"})]
    members += [("srv/b", tarfile.LNKTYPE, {"linkname": "srv/a"})]
    members += [("etc/x", tarfile.REGTYPE, {}), ("etc/y", tarfile.REGTYPE, {})]
    path = _archive(tmp_path, *members)
    entries = tf.index_archive(path.read_bytes())
    overlays = (OverlayEntry("/srv/a", b"new", 0o644, 0, 0), OverlayEntry("/etc/z", b"", 0, 0, 0))
    plan = make_plan(entries, Selection(), overlays, {})
    only, outside = region(plan)
    assert only == {"/srv", "/srv/a", "/srv/b", "/etc", "/etc/z"}
    assert outside == {"/etc": (24, 12)}  # /etc/x and /etc/y: 12 bytes each
    headers = read_headers(path.read_bytes(), entries)
    before = tree_of_plan(plan, headers, path, mtime=EPOCH, before_overlays=True, only=only)
    assert isinstance(before, dict) and sorted(before) == ["/etc", "/srv", "/srv/a", "/srv/b"]


def test_a_header_rfs_cannot_read_gives_a_reason(tmp_path: Path) -> None:
    path = _archive(
        tmp_path,
        ("etc/a", tarfile.REGTYPE, {"pax_headers": {"atime": "soon"}}),
        ("etc/b", tarfile.REGTYPE, {"pax_headers": {"ctime": "inf"}}),
    )
    entries = tf.index_archive(path.read_bytes())
    headers = read_headers(path.read_bytes(), entries)
    assert [h.readable for h in headers] == [False, False]
    plan = make_plan(entries, Selection(), (), {})
    reason = tree_of_plan(plan, headers, path, mtime=EPOCH)
    assert reason == "the export entry /etc/a has a header field rfs cannot read"
