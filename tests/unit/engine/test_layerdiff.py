"""The normalised layer diff: an overlay upper directory and a layer tarball of the same change
give the same bytes; what the walk cannot read exactly, or what is too big, is said so."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from rfs.engine.layerdiff import (
    Limit,
    TooLarge,
    Unreadable,
    normalise_layer,
    write_upper_dir,
)
from rfs.errors import EngineError

BIG = Limit(data_bytes=1 << 20, entries=1000)
MTIME = 1_700_000_000


def _xattr_ok(path: Path) -> bool:
    try:
        os.setxattr(path, "user.rfs-test", b"1")
        os.setxattr(path, "trusted.rfs-test", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.rfs-test")
    os.removexattr(path, "trusted.rfs-test")
    return True


def _upper(tmp: Path) -> Path:
    """An overlay upper directory as a command leaves it (needs root: devices, trusted.*)."""
    up = tmp / "upper"
    (up / "etc").mkdir(parents=True)
    (up / "etc" / "conf").write_bytes(b"conf\n")
    os.setxattr(up / "etc" / "conf", "user.note", b"kept")
    os.mknod(up / "etc" / "passwd", stat.S_IFCHR | 0o000, 0)  # a deletion
    (up / "opaque").mkdir()
    os.setxattr(up / "opaque", "trusted.overlay.opaque", b"y")
    (up / "opaque" / "only").write_bytes(b"only\n")
    (up / "z-first").write_bytes(b"linked\n")
    os.link(up / "z-first", up / "a-second")
    os.symlink("../etc/conf", up / "opaque" / "sym")
    os.mkfifo(up / "fifo")
    os.chmod(up / "z-first", 0o4755)
    for path in [up, *up.rglob("*")]:
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return up


def _layer_tarball() -> bytes:
    """The same change as a layer tarball written in another order, as an engine might."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", **fields: object) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = kind, MTIME, 0o755
            info.uname = info.gname = "root"
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE)
        add("z-first", tarfile.REGTYPE, b"linked\n", mode=0o4755)
        add("a-second", tarfile.LNKTYPE, linkname="z-first")
        add("fifo", tarfile.FIFOTYPE, mode=0o644)
        add("opaque/", tarfile.DIRTYPE)
        add("opaque/sym", tarfile.SYMTYPE, linkname="../etc/conf", mode=0o777)
        add("opaque/only", tarfile.REGTYPE, b"only\n", mode=0o644)
        add("opaque/.wh..wh..opq", tarfile.REGTYPE, mode=0o644, mtime=0)
        add("etc/", tarfile.DIRTYPE)
        add("etc/.wh.passwd", tarfile.REGTYPE, mode=0o644, mtime=5)
        add(
            "etc/conf",
            tarfile.REGTYPE,
            b"conf\n",
            mode=0o644,
            pax_headers={"SCHILY.xattr.user.note": "kept"},
        )
    return buf.getvalue()


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and trusted.* xattrs need root")
def test_the_walk_and_the_tarball_give_the_same_bytes(tmp_path: Path) -> None:
    if not _xattr_ok(tmp_path):
        pytest.skip("this filesystem keeps no user.*/trusted.* xattrs")
    walked, normalised = io.BytesIO(), io.BytesIO()
    write_upper_dir(_upper(tmp_path), walked, BIG)
    normalise_layer(io.BytesIO(_layer_tarball()), normalised, BIG)
    assert walked.getvalue() == normalised.getvalue()
    assert _names(walked.getvalue()) == [
        "a-second",
        "etc",
        "etc/.wh.passwd",
        "etc/conf",
        "fifo",
        "opaque",
        "opaque/.wh..wh..opq",
        "opaque/only",
        "opaque/sym",
        "z-first",
    ]
    with tarfile.open(fileobj=io.BytesIO(walked.getvalue())) as tar:
        first, second = tar.getmember("a-second"), tar.getmember("z-first")
        assert first.isreg() and first.mode == 0o4755
        assert second.islnk() and second.linkname == "a-second"
        assert tar.getmember("etc/conf").pax_headers["SCHILY.xattr.user.note"] == "kept"
        assert "SCHILY.xattr.trusted.overlay.opaque" not in tar.getmember("opaque").pax_headers


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs need root")
def test_a_redirected_directory_is_not_read_from_the_upper_directory(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "moved").mkdir(parents=True)
    try:
        os.setxattr(up / "moved", "trusted.overlay.redirect", b"/old")
    except OSError:
        pytest.skip("this filesystem keeps no trusted.* xattrs")
    with pytest.raises(Unreadable, match="moved"):
        write_upper_dir(up, io.BytesIO(), BIG)


def test_over_the_limit_is_too_large(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    up.mkdir()
    (up / "a").write_bytes(b"x" * 100)
    (up / "b").write_bytes(b"x" * 100)
    write_upper_dir(up, io.BytesIO(), Limit(data_bytes=200, entries=2))
    with pytest.raises(TooLarge):
        write_upper_dir(up, io.BytesIO(), Limit(data_bytes=199, entries=2))
    with pytest.raises(TooLarge):
        write_upper_dir(up, io.BytesIO(), Limit(data_bytes=200, entries=1))
    os.link(up / "a", up / "c")  # a second name costs an entry, not its bytes again
    write_upper_dir(up, io.BytesIO(), Limit(data_bytes=200, entries=3))


def test_a_layer_naming_a_path_outside_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("../escape"))
    buf.seek(0)
    with pytest.raises(EngineError, match="unsafe name"):
        normalise_layer(buf, io.BytesIO(), BIG)


def test_a_container_exports_as_committed_unless_it_changed_what_the_init_layer_masks(
    tmp_path: Path,
) -> None:
    from rfs.engine.layerdiff import exports_as_committed

    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc").chmod(0o755)
    (upper / "etc" / "motd").write_bytes(b"x" * 100)
    assert exports_as_committed(upper, None, init_layer=True)
    assert not exports_as_committed(
        upper, Limit(data_bytes=1000, entries=10), init_layer=True
    )  # small
    assert exports_as_committed(
        upper, Limit(data_bytes=50, entries=10), init_layer=True
    )  # more data
    assert exports_as_committed(
        upper, Limit(data_bytes=1000, entries=1), init_layer=True
    )  # more entries
    (upper / "etc").chmod(0o700)  # a container of the image shows the init layer's 0755
    assert not exports_as_committed(upper, None, init_layer=True)
    (upper / "etc").chmod(0o755)
    (upper / "etc" / "mtab").symlink_to("../proc/self/mounts")  # systemd's postinst does
    assert not exports_as_committed(upper, Limit(data_bytes=50, entries=10), init_layer=True)
    assert exports_as_committed(upper, Limit(data_bytes=50, entries=10), init_layer=False)
    assert not exports_as_committed(tmp_path / "missing", None, init_layer=True)
