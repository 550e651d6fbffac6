"""diff_trees: which operations, in which order, and when it declines; tree_of_plan: the tree
the stream of a plan makes (hard links, the stream's fixes, xattrs mke2fs keeps)."""

from __future__ import annotations

import dataclasses
import io
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest

from rfs.fs import tarformat as tf
from rfs.fs.ext4ops import (
    AddName,
    Fields,
    Links,
    MakeDir,
    MakeNode,
    Patch,
    Remove,
    RemoveDir,
    RemoveXattr,
    SetXattr,
    Symlink,
    Write,
)
from rfs.fs.overlay import OverlayEntry
from rfs.fs.plan import make_plan
from rfs.fs.selection import Selection
from rfs.fs.treediff import Extent, Node, Tree, diff_trees, read_headers, tree_of_plan

EPOCH = 1_700_000_000


def _tree(*nodes: Node) -> Tree:
    return {node.path: node for node in nodes}


def _d(path: str, mode: int = 0o755, **kw: Any) -> Node:
    return Node(path, "dir", mode, **kw)


def _f(path: str, content: bytes = b"", mode: int = 0o644, **kw: Any) -> Node:
    return Node(path, "file", mode, content=content, **kw)


def _ok(before: Tree, after: Tree) -> Patch:
    patch = diff_trees(before, after)
    assert not isinstance(patch, str), patch
    return patch


BEFORE = _tree(
    _d("/etc"),
    _f("/etc/a", b"a"),
    _f("/etc/b", b"b", group="/etc/b"),
    _f("/etc/b2", b"b", group="/etc/b"),
    _d("/srv"),
    _d("/srv/x"),
    _d("/srv/x/y"),
    _f("/srv/x/y/z", b"z"),
    Node("/etc/l", "symlink", 0o777, target="a"),
)


def test_the_same_trees_give_nothing_to_do() -> None:
    assert _ok(BEFORE, dict(BEFORE)).ops == []


def test_a_subtree_goes_children_first_and_a_file_takes_its_place() -> None:
    after = {p: n for p, n in BEFORE.items() if not p.startswith("/srv/")}
    after["/srv/x"] = _f("/srv/x", b"flat")
    ops = _ok(BEFORE, after).ops
    assert ops[:4] == [Remove("/srv/x/y/z"), RemoveDir("/srv/x/y"), RemoveDir("/srv/x"), *ops[3:4]]
    assert ops[3] == Write("/srv/x", b"flat")
    assert ops[4] == Fields("/srv/x", "file", 0o644, 0, 0, 0, new=True)


def test_metadata_and_xattr_changes_rewrite_nothing() -> None:
    after = dict(BEFORE)
    after["/etc/a"] = _f("/etc/a", b"a", 0o600, uid=3, xattrs=(("security.capability", b"c"),))
    ops = _ok(BEFORE, after).ops
    assert ops == [
        Fields("/etc/a", "file", 0o600, 3, 0, 0),
        SetXattr("/etc/a", "security.capability", b"c"),
    ]
    assert _ok(after, BEFORE).ops == [
        Fields("/etc/a", "file", 0o644, 0, 0, 0),
        RemoveXattr("/etc/a", "security.capability"),
    ]


def test_hard_links_are_added_and_dropped_with_their_count() -> None:
    after = dict(BEFORE)
    after["/etc/b3"] = _f("/etc/b3", b"b", group="/etc/b")
    assert _ok(BEFORE, after).ops == [AddName("/etc/b3", "/etc/b"), Links("/etc/b", 3)]
    del after["/etc/b"], after["/etc/b3"]
    after["/etc/b2"] = _f("/etc/b2", b"b")
    assert _ok(BEFORE, after).ops == [Remove("/etc/b"), Links("/etc/b2", 1)]


def test_a_new_inode_with_two_names_is_written_once() -> None:
    after = dict(BEFORE)
    after["/etc/n"] = _f("/etc/n", b"n", group="/etc/n")
    after["/srv/n"] = _f("/srv/n", b"n", group="/etc/n")
    ops = _ok(BEFORE, after).ops
    assert Write("/etc/n", b"n") in ops
    assert ops[-2:] == [AddName("/srv/n", "/etc/n"), Links("/etc/n", 2)]


def test_a_name_joining_another_inode_is_written_again() -> None:
    after = dict(BEFORE)
    after["/etc/a"] = _f("/etc/a", b"b", group="/etc/a")
    after["/etc/b"] = _f("/etc/b", b"b", group="/etc/a")
    after["/etc/b2"] = _f("/etc/b2", b"b", group="/etc/a")
    ops = _ok(BEFORE, after).ops
    assert ops[0] == Remove("/etc/a")
    assert AddName("/etc/a", "/etc/b") in ops and ops[-1] == Links("/etc/b", 3)


def test_type_changes_and_devices() -> None:
    after = dict(BEFORE)
    after["/etc/a"] = Node("/etc/a", "char", 0o600, device=(300, 70000))
    after["/etc/l"] = _f("/etc/l", b"a")
    after["/etc/p"] = Node("/etc/p", "fifo", 0o600)
    ops = _ok(BEFORE, after).ops
    assert ops[:2] == [Remove("/etc/l"), Remove("/etc/a")]
    assert MakeNode("/etc/a", "char", (300, 70000)) in ops
    assert MakeNode("/etc/p", "fifo") in ops
    assert Write("/etc/l", b"a") in ops


def test_the_script_depends_on_the_paths_not_on_the_order_given() -> None:
    after = {p: n for p, n in BEFORE.items() if not p.startswith("/srv")}
    after |= _tree(_d("/opt"), _d("/opt/q"), _f("/opt/q/r", b"r"), _f("/opt/s", b"s"))
    after["/opt/l"] = Node("/opt/l", "symlink", 0o777, target="s")
    expected = _ok(BEFORE, after).ops
    for seed in range(5):
        shuffled = list(after.items())
        random.Random(seed).shuffle(shuffled)
        old = list(BEFORE.items())
        random.Random(seed).shuffle(old)
        assert _ok(dict(old), dict(shuffled)).ops == expected
    assert expected.index(MakeDir("/opt")) < expected.index(MakeDir("/opt/q"))
    assert Symlink("/opt/l", "s") in expected


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        ({"/etc/x/y": _f("/etc/x/y")}, "/etc/x/y has no parent directory in the tree"),
        ({"/etc/a/y": _f("/etc/a/y")}, "/etc/a is in the way of /etc/a/y"),
        ({'/etc/say "hi"': _f('/etc/say "hi"')}, "debugfs cannot be given the name"),
    ],
)
def test_what_cannot_be_written_is_declined(after: Tree, reason: str) -> None:
    result = diff_trees(BEFORE, BEFORE | after)
    assert isinstance(result, str) and reason in result


def test_a_big_directory_that_shrinks_is_declined() -> None:
    many = _tree(_d("/d"), *(_f(f"/d/{'n' * 40}{i:03}") for i in range(200)))
    fewer = {p: n for p, n in many.items() if not p.endswith(("1", "2", "3", "4", "5"))}
    assert diff_trees(many, fewer) == "the directory /d would shrink"
    some = {p: n for p, n in many.items() if not p.endswith("199")}
    assert isinstance(diff_trees(many, some), Patch)  # still two blocks either way


def test_contents_in_files_compare_by_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"xxabcxx")
    one = _tree(_f("/f", Extent(data, 2, 3)))  # type: ignore[arg-type]
    assert _ok(one, _tree(_f("/f", b"abc"))).ops == []
    assert Extent(data, 2, 3).read() == b"abc"
    assert _ok(one, _tree(_f("/f", b"abd"))).ops[0] == Remove("/f")


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
