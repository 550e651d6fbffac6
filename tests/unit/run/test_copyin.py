"""rfs/run/copyin.py: the tar archive `[[copy]]` hands the engine, read back member by member:
owners and modes from the build script, never the checkout's; symlinks to directories already
in the container written through; a resolved path with `..` refused."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from rfs.errors import RfsError
from rfs.run.copyin import CopyIn
from rfs.script.model import Copy
from tests.packages import write_package

Members = dict[str, tuple[str, int, int, int, str]]  # name -> (kind, mode, uid, gid, content)


def archive(copyin: CopyIn, links: dict[str, str] | None = None) -> tuple[int, Members]:
    """Write `copyin`'s archive with `links` (container symlinks to directories: path ->
    where it leads); return the entry count and each member."""
    asked: list[str] = []

    def resolve(path: str) -> str | None:
        asked.append(path)
        return (links or {}).get(path)

    out = io.BytesIO()
    count = copyin.write(out, resolve)
    assert len(asked) == len(set(asked))  # each directory is asked about once
    out.seek(0)
    members: Members = {}
    with tarfile.open(fileobj=out) as tar:
        for m in tar.getmembers():
            assert m.mtime == copyin.mtime and m.uname == m.gname == ""
            kind = "dir" if m.isdir() else "symlink" if m.issym() else "file"
            f = tar.extractfile(m) if m.isfile() else None
            content = f.read().decode() if f is not None else m.linkname
            members[m.name] = (kind, m.mode, m.uid, m.gid, content)
    return count, members


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = write_package(
        tmp_path / "tree",
        None,
        {"bin/tool": "#!/bin/sh\n", "etc/conf": "key=1\n", "etc/sub/deep": "deep\n"},
    )
    (root / "bin" / "tool").chmod(0o700)
    (root / "etc" / "conf").chmod(0o600)
    os.symlink("../etc/conf", root / "bin" / "conf-link")
    return root


def test_a_tree_with_default_modes(tree: Path) -> None:
    count, members = archive(CopyIn(((Copy("/tree", "/opt/app"), tree),)))
    assert count == len(members) == 8
    assert members["opt/app"] == ("dir", 0o755, 0, 0, "")
    assert members["opt/app/bin"] == ("dir", 0o755, 0, 0, "")
    assert members["opt/app/bin/tool"] == ("file", 0o755, 0, 0, "#!/bin/sh\n")  # owner's x
    assert members["opt/app/etc/conf"] == ("file", 0o644, 0, 0, "key=1\n")  # not 0600
    assert members["opt/app/etc/sub/deep"][4] == "deep\n"
    assert members["opt/app/bin/conf-link"] == ("symlink", 0o777, 0, 0, "../etc/conf")
    names = list(members)
    assert names.index("opt/app/etc") < names.index("opt/app/etc/sub/deep")  # parents first


def test_mode_and_owner_from_the_script(tree: Path) -> None:
    copy = Copy("/tree", "/srv/x/", mode=0o640, uid=1000, gid=100)
    _, members = archive(CopyIn(((copy, tree),), mtime=1234))
    assert members["srv/x"][1:4] == (0o750, 1000, 100)  # search bit wherever read is granted
    assert members["srv/x/etc/sub"][1:4] == (0o750, 1000, 100)
    assert members["srv/x/bin/tool"][1:4] == (0o640, 1000, 100)


def test_a_single_file_and_the_root(tmp_path: Path, tree: Path) -> None:
    motd = write_package(tmp_path / "f", None, {"motd": "hi\n"}) / "motd"
    count, members = archive(
        CopyIn(((Copy("/motd", "/etc/motd", mode=0o600), motd), (Copy("/tree", "/"), tree)))
    )
    assert members["etc/motd"] == ("file", 0o600, 0, 0, "hi\n")
    assert "" not in members and "." not in members  # the root keeps its own owner and mode
    assert members["bin/tool"][4] == "#!/bin/sh\n"
    assert count == len(members)


def test_symlinked_directories_are_written_through(tmp_path: Path) -> None:
    host = write_package(tmp_path / "t", None, {"init": "#!/bin/sh\n"})
    copy = Copy("/t", "/sbin")
    _, members = archive(CopyIn(((copy, host),)), {"/sbin": "/usr/sbin"})
    assert set(members) == {"usr/sbin", "usr/sbin/init"}  # the link /sbin itself is kept
    file_copy = Copy("/t/init", "/lib/x/init")
    _, members = archive(CopyIn(((file_copy, host / "init"),)), {"/lib": "/usr/./lib/"})
    assert set(members) == {"usr/lib/x/init"}


def test_a_resolved_path_leading_up_is_refused(tmp_path: Path) -> None:
    host = write_package(tmp_path / "t", None, {"f": "x"})
    with pytest.raises(RfsError, match="not a clean path"):
        archive(CopyIn(((Copy("/t/f", "/a/f"), host / "f"),)), {"/a": "/b/../etc"})
