"""diff_trees: which operations, in which order, and when it declines."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from rfs.fs.ext4ops import (
    AddName,
    Extent,
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
from rfs.fs.treediff import Node, Tree, diff_trees


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
        ({"/": _d("/", 0o700)}, "only one of the trees has an entry for the root"),
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


def test_big_contents_compare_piece_by_piece(tmp_path: Path) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB: more than one piece
    data = tmp_path / "data"
    data.write_bytes(b"-" + big)
    one = _tree(_f("/f", Extent(data, 1, len(big))))  # type: ignore[arg-type]
    assert _ok(one, _tree(_f("/f", big))).ops == []
    assert _ok(one, _tree(_f("/f", big[:-1] + b"!"))).ops[0] == Remove("/f")


def test_the_roots_own_fields_change_like_any_directory() -> None:
    before = BEFORE | {"/": _d("/", 0o755, mtime=5)}
    assert _ok(before, before | {"/": _d("/", 0o700, mtime=5)}).ops == [
        Fields("/", "dir", 0o700, 0, 0, 5)
    ]
