"""A patch derived from two exports turns the image of the first into the image of the second.

Each case makes a "before" and an "after" export tar with tarfile, builds the image of each
with assemble_ext4 (the full route, `mke2fs -d -`), writes diff_trees(before, after) into a
copy of the first with debugfs, and compares it with the second inode field by inode field,
hard-link group by group and byte by byte (tests/fsinspect.assert_same_tree). Every case also
checks that the two images differ without the patch, so it can fail.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import EnvironmentProblem
from rfs.fs.ext4 import assemble_ext4, mkfs_version
from rfs.fs.ext4ops import AddName, Op, Patch, RemoveXattr, SetXattr, Write
from rfs.fs.ext4patch import apply_patch, tree_of_export
from rfs.fs.selection import Selection
from rfs.fs.treediff import diff_trees
from tests.conftest import require_or_skip
from tests.fsinspect import assert_same_tree, inode_details, list_ext4

pytestmark = pytest.mark.integration

SEED = bytes(range(32))
EPOCH = 1_700_000_000
CAP = "\x01\x00\x00\x02" + "\x00" * 16
CAP2 = "\x01\x00\x00\x02\x00\x20" + "\x00" * 14
Spec = dict[str, dict[str, Any]]
BIG = "a-name-long-enough-to-fill-blocks"  # 150 of them: two directory blocks


def _file(data: bytes = b"", mode: int = 0o644, **kw: Any) -> dict[str, Any]:
    return {"kind": tarfile.REGTYPE, "data": data, "mode": mode, **kw}


def _dir(mode: int = 0o755, **kw: Any) -> dict[str, Any]:
    return {"kind": tarfile.DIRTYPE, "mode": mode, **kw}


def _sym(target: str) -> dict[str, Any]:
    return {"kind": tarfile.SYMTYPE, "link": target, "mode": 0o777}


def _hard(target: str, mode: int = 0o755) -> dict[str, Any]:
    return {"kind": tarfile.LNKTYPE, "link": target, "mode": mode}


def _dev(kind: bytes, major: int, minor: int, mode: int = 0o660) -> dict[str, Any]:
    return {"kind": kind, "device": (major, minor), "mode": mode}


BEFORE: Spec = {
    "etc": _dir(),
    "etc/motd": _file(b"hello\n", uid=5, gid=6),
    "etc/passwd": _file(b"root:x:0:0\n"),
    "etc/link": _sym("motd"),
    "usr": _dir(),
    "usr/bin": _dir(),
    "usr/bin/tool": _file(b"#!/bin/sh\n" * 300, 0o4755),
    "usr/bin/tool2": _hard("usr/bin/tool", 0o4750),  # the inode takes the link's mode
    "usr/bin/ping": _file(b"ping\n", 0o755, pax={"SCHILY.xattr.security.capability": CAP}),
    "usr/bin/plain": _file(b"plain\n", 0o755),
    "usr/share": _dir(),
    "usr/share/doc": _dir(),
    "usr/share/doc/a": _dir(0o750, uid=3),
    "usr/share/doc/a/b": _dir(),
    "usr/share/doc/a/b/c": _dir(),
    "usr/share/doc/a/b/c/deep": _file(b"deep\n"),
    "usr/share/doc/a/b/c/link": _sym("deep"),
    "usr/share/doc/a/readme": _file(b"readme\n" * 2000),
    "usr/share/doc/a/readme2": _hard("usr/share/doc/a/readme", 0o644),
    "dev": _dir(),
    "dev/null": _dev(tarfile.CHRTYPE, 1, 3, 0o666),
    "dev/sda": _dev(tarfile.BLKTYPE, 8, 0),
    "run": _dir(0o755),
    "run/initctl": _dev(tarfile.FIFOTYPE, 0, 0, 0o600),
    "srv": _dir(0o2775, uid=1234, gid=1234),
    "srv/data": _file(b"data\n", uid=1234, gid=1234),
    "opt": _dir(),
    "opt/app": _dir(0o755, uid=7),
    "opt/app/bin": _dir(),
    "opt/app/bin/run": _file(b"run v1\n", 0o755),
    "opt/app/lib.so": _file(b"\x7fELF" + bytes(9000)),
    "var": _dir(),
    "var/x": _file(b"x\n"),
    "var/log": _dir(),
    "var/big": _dir(),
    **{f"var/big/{BIG}-{i:03}": _dev(tarfile.FIFOTYPE, 0, 0) for i in range(150)},
    "home": _dir(),
    "home/user": _dir(0o700, uid=1000, gid=1000),
    "home/user/file": _file(b"mine\n", 0o600, uid=1000, gid=1000),
}


def _write(spec: Spec, path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, entry in spec.items():
            info = tarfile.TarInfo(name)
            info.type, info.mode = entry["kind"], entry["mode"]
            info.uid, info.gid = entry.get("uid", 0), entry.get("gid", 0)
            info.mtime = entry.get("mtime", 1_600_000_000)
            info.linkname = entry.get("link", "")
            info.devmajor, info.devminor = entry.get("device", (0, 0))
            info.pax_headers = dict(entry.get("pax", {}))
            data = entry.get("data", b"")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def _drop(spec: Spec, path: str) -> None:
    for name in [n for n in spec if n == path or n.startswith(path + "/")]:
        del spec[name]


def _set(spec: Spec, path: str, entry: dict[str, Any]) -> None:
    """Put `entry` at `path` where the old entry was (its subtree goes), or at the end."""
    for name in [n for n in spec if n.startswith(path + "/")]:
        del spec[name]
    spec[path] = entry


def _edit(*changes: Callable[[Spec], None]) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        for change in changes:
            change(spec)

    return apply


def _meta(path: str, **fields: Any) -> Callable[[Spec], None]:
    return lambda spec: spec[path].update(fields)


def _opaque(spec: Spec) -> None:
    _drop(spec, "opt/app")
    spec["opt/app"] = _dir(0o750, uid=8)
    spec["opt/app/bin"] = _dir()
    spec["opt/app/bin/run"] = _file(b"run v2\n", 0o755)
    spec["opt/app/share"] = _file(b"new\n")


CASES: dict[str, Callable[[Spec], None]] = {
    "a file is deleted": lambda s: _drop(s, "etc/passwd"),
    "a deep subtree is removed": lambda s: _drop(s, "usr/share/doc"),
    "a rename is a delete and an add": _edit(
        lambda s: _drop(s, "etc/motd"), lambda s: _set(s, "etc/motd.old", _file(b"hello\n"))
    ),
    "a file's content changes": _meta("etc/motd", data=b"bye\n", mtime=1_650_000_000),
    "only the mode and owner change": _meta("srv/data", mode=0o600, uid=1, gid=2),
    "access and change times from PAX records": _edit(
        _meta("etc/motd", pax={"atime": "1600000001.5", "ctime": "1600000002"}),
        lambda s: _set(s, "etc/new", _file(b"n\n", pax={"atime": "1", "mtime": "5.25"})),
    ),
    "a directory's own fields change": _meta("srv", mode=0o755, uid=0, gid=0, mtime=1),
    "a hard link is added to an existing file": lambda s: _set(
        s, "etc/passwd-", _hard("etc/passwd", 0o644)
    ),
    "a hard link is removed": lambda s: _drop(s, "usr/bin/tool2"),
    "the first name of a linked pair is removed": _edit(
        lambda s: _drop(s, "usr/bin/tool"),
        lambda s: _set(s, "usr/bin/tool2", _file(b"#!/bin/sh\n" * 300, 0o4755)),
    ),
    "a new file with two links": _edit(
        lambda s: _set(s, "var/new", _file(b"twice\n", 0o640)),
        lambda s: _set(s, "var/log/new", _hard("var/new", 0o640)),
    ),
    "two separate files become linked": lambda s: _set(
        s, "usr/bin/plain", _hard("usr/bin/ping", 0o755)
    ),
    "a linked pair is split": lambda s: _set(s, "usr/bin/tool2", _file(b"#!/bin/sh\n" * 300)),
    "a capability is added": _meta("usr/bin/plain", pax={"SCHILY.xattr.security.capability": CAP}),
    "a capability changes": _meta("usr/bin/ping", pax={"SCHILY.xattr.security.capability": CAP2}),
    "a capability is removed": _meta("usr/bin/ping", pax={}),
    "a file becomes a directory": _edit(
        lambda s: _set(s, "var/x", _dir(0o711)), lambda s: _set(s, "var/x/in", _file(b"in\n"))
    ),
    "a directory becomes a file": lambda s: _set(s, "usr/share", _file(b"flat\n")),
    "a file becomes a symlink": lambda s: _set(s, "etc/passwd", _sym("/etc/motd")),
    "a symlink becomes a file": lambda s: _set(s, "etc/link", _file(b"now a file\n")),
    "a file becomes a device": lambda s: _set(s, "var/x", _dev(tarfile.CHRTYPE, 10, 200)),
    "devices and a FIFO are added": _edit(
        lambda s: _set(s, "dev/zero", _dev(tarfile.CHRTYPE, 1, 5, 0o666)),
        lambda s: _set(s, "dev/big", _dev(tarfile.BLKTYPE, 300, 70000, 0o600)),
        lambda s: _set(s, "run/pipe", _dev(tarfile.FIFOTYPE, 0, 0, 0o620)),
    ),
    "a device's numbers change": _meta("dev/sda", device=(8, 16)),
    "a device and a FIFO are removed": _edit(
        lambda s: _drop(s, "dev/null"), lambda s: _drop(s, "run/initctl")
    ),
    "a directory is replaced whole": _opaque,
    "a directory grows past a block": _edit(
        *(
            (lambda s, i=i: _set(s, f"var/log/{BIG}-{i:03}", _dev(tarfile.FIFOTYPE, 0, 0)))
            for i in range(150)
        )
    ),
    "a big directory loses a few names": _edit(
        lambda s: _meta("var/log", mode=0o755)(s),
        *((lambda s, i=i: _drop(s, f"var/big/{BIG}-{i:03}")) for i in range(0, 150, 50)),
    ),
    "new directories, owners and a long symlink": _edit(
        lambda s: _set(s, "srv/new", _dir(0o700, uid=70000, gid=80000)),
        lambda s: _set(s, "srv/new/f", _file(b"f\n", 0o400, uid=4_000_000_000)),
        lambda s: _set(s, "srv/new/l", _sym("/" + "x" * 200)),
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The "before" export and its image (made once: every case starts from a copy)."""
    try:
        mkfs_version()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    root = tmp_path_factory.mktemp("before")
    _write(BEFORE, root / "before.tar")
    _image(root / "before.tar", root / "before.ext4")
    return root / "before.tar", root / "before.ext4"


def _image(export: Path, out: Path) -> None:
    assemble_ext4(export, Selection(), (), out, size_mib=32, seed=SEED, source_date_epoch=EPOCH)


def _patch(before: Path, after: Path) -> Patch:
    old = tree_of_export(before, Selection(), mtime=EPOCH)
    new = tree_of_export(after, Selection(), mtime=EPOCH)
    assert not isinstance(old, str) and not isinstance(new, str)
    patch = diff_trees(old, new)
    assert not isinstance(patch, str), patch
    return patch


def _patched(image: Path, patch: Patch, out: Path) -> None:
    shutil.copyfile(image, out)
    apply_patch(out, patch, mtime=EPOCH, fs_uuid=None, undo=out.with_suffix(".undo"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_patch_of_two_exports_gives_the_image_of_the_second(
    base: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    before_tar, before_image = base
    spec = copy.deepcopy(BEFORE)
    CASES[case](spec)
    _write(spec, tmp_path / "after.tar")
    _image(tmp_path / "after.tar", tmp_path / "full.ext4")
    assert inode_details(before_image) != inode_details(tmp_path / "full.ext4")  # can fail
    patch = _patch(before_tar, tmp_path / "after.tar")
    _patched(before_image, patch, tmp_path / "patched.ext4")
    assert_same_tree(tmp_path / "full.ext4", tmp_path / "patched.ext4")


def test_metadata_changes_and_new_links_do_not_rewrite_files(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    before_tar, _ = base
    spec = copy.deepcopy(BEFORE)
    spec["srv/data"].update(mode=0o600, uid=1)
    spec["usr/bin/ping"]["pax"] = {}
    spec["etc/passwd-"] = _hard("etc/passwd", 0o644)
    _write(spec, tmp_path / "after.tar")
    patch = _patch(before_tar, tmp_path / "after.tar")
    assert not any(isinstance(op, Write) for op in patch.ops)
    assert AddName("/etc/passwd-", "/etc/passwd") in patch.ops


def test_xattrs_mke2fs_ignores_are_left_alone(base: tuple[Path, Path], tmp_path: Path) -> None:
    before_tar, before_image = base
    spec = copy.deepcopy(BEFORE)
    spec["etc/motd"]["pax"] = {"SCHILY.xattr.user.note": "x", "SCHILY.xattr.trusted.t": "y"}
    _write(spec, tmp_path / "after.tar")
    _image(tmp_path / "after.tar", tmp_path / "full.ext4")
    assert _patch(before_tar, tmp_path / "after.tar").ops == []
    assert inode_details(before_image) == inode_details(tmp_path / "full.ext4")


def test_a_directory_that_would_shrink_takes_the_full_route(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    before_tar, before_image = base
    spec = copy.deepcopy(BEFORE)
    for i in range(100):
        _drop(spec, f"var/big/{BIG}-{i:03}")
    _write(spec, tmp_path / "after.tar")
    old = tree_of_export(before_tar, Selection(), mtime=EPOCH)
    new = tree_of_export(tmp_path / "after.tar", Selection(), mtime=EPOCH)
    assert not isinstance(old, str) and not isinstance(new, str)
    assert diff_trees(old, new) == "the directory /var/big would shrink"
    _image(tmp_path / "after.tar", tmp_path / "full.ext4")  # why: mke2fs makes it smaller
    assert (
        list_ext4(tmp_path / "full.ext4")["/var/big"].size
        < list_ext4(before_image)["/var/big"].size
    )


def test_any_xattr_can_be_written_and_removed(base: tuple[Path, Path], tmp_path: Path) -> None:
    """mke2fs keeps only security.capability from a tar, but a tree may carry any xattr (a
    layer diff read from elsewhere): ea_set and ea_rm write what the tree says."""
    _, before_image = base
    ops: list[Op] = [
        SetXattr("/etc/motd", "user.note", b"a note"),
        SetXattr("/etc/motd", "trusted.t", bytes(range(16))),
        RemoveXattr("/usr/bin/ping", "security.capability"),
    ]
    _patched(before_image, Patch(ops), tmp_path / "patched.ext4")
    found = list_ext4(tmp_path / "patched.ext4")
    assert found["/etc/motd"].xattrs == {"user.note": b"a note", "trusted.t": bytes(range(16))}
    assert found["/usr/bin/ping"].xattrs == {}
    assert list_ext4(before_image)["/usr/bin/ping"].xattrs != {}
    subprocess.run(["e2fsck", "-fn", str(tmp_path / "patched.ext4")], check=True)


def test_the_roots_own_entry(base: tuple[Path, Path], tmp_path: Path) -> None:
    del base  # only for its check that mke2fs can read tar input
    spec: Spec = {".": _dir(0o755, mtime=1_500_000_000), "etc": _dir()}
    _write(spec, tmp_path / "before.tar")
    _image(tmp_path / "before.tar", tmp_path / "before.ext4")
    spec["."] = _dir(0o700, uid=3, mtime=1_650_000_000)
    _write(spec, tmp_path / "after.tar")
    _image(tmp_path / "after.tar", tmp_path / "full.ext4")
    assert inode_details(tmp_path / "before.ext4") != inode_details(tmp_path / "full.ext4")
    patch = _patch(tmp_path / "before.tar", tmp_path / "after.tar")
    _patched(tmp_path / "before.ext4", patch, tmp_path / "patched.ext4")
    assert_same_tree(tmp_path / "full.ext4", tmp_path / "patched.ext4")
