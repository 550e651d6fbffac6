"""The pieces of the filesystem drivers that need no mkfs: staging, fakeroot state, the mtime
clamp and /etc fixes of the filter, sizes, vfat's warnings, and `rfs boot`'s decisions."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from rfs.errors import ScriptError, UsageError
from rfs.fs import staging, vfat
from rfs.fs.image import check_size, with_headroom
from rfs.fs.tarformat import TarError
from rfs.fs.tarstream import Selection, StreamStats, write_image_stream

CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _info(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    **extra: object,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    for key, value in extra.items():
        setattr(info, key, value)
    return info


TREE = [
    _info("d", tarfile.DIRTYPE, 0o700, 1234, 1234),
    _info("d/secret", mode=0o000, uid=4000000000, gid=7),
    _info("d/suid", mode=0o4755),
    _info("d/link", tarfile.LNKTYPE, linkname="d/suid"),
    _info("d/sym", tarfile.SYMTYPE, 0o777, linkname="../etc/x"),
    _info("d/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
    _info("d/fifo", tarfile.FIFOTYPE),
    _info(
        "d/cap", mode=0o755, pax_headers={"SCHILY.xattr.security.capability": CAP.decode("latin-1")}
    ),
]
DATA = {"d/secret": b"s3cret\n", "d/suid": b"#!/bin/sh\n", "d/cap": b"cap\n"}


def test_staging_keeps_content_readable_and_metadata_aside(tmp_path: Path) -> None:
    staged = staging.extract(io.BytesIO(_tar(TREE, DATA)), tmp_path, clamp_mtime=1000)
    # The real files are the user's, readable; what the image must say is in `meta`.
    assert (tmp_path / "d/secret").read_bytes() == b"s3cret\n"
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert (tmp_path / "d/null").is_file() and (tmp_path / "d/fifo").is_fifo()
    assert os.readlink(tmp_path / "d/sym") == "../etc/x"
    assert (tmp_path / "d/link").stat().st_ino == (tmp_path / "d/suid").stat().st_ino
    m = staged.meta
    assert m["d/secret"] == staging.Meta(stat.S_IFREG, 4000000000, 7)
    assert m["d"].mode == stat.S_IFDIR | 0o700 and m["d"].uid == 1234
    assert m["d/suid"].mode == stat.S_IFREG | 0o4755
    assert m["d/null"].mode == stat.S_IFCHR | 0o666 and m["d/null"].rdev == os.makedev(1, 3)
    assert m["d/cap"].xattrs == {"security.capability": CAP}
    assert "d/link" not in m  # a hard link shares its target's inode and metadata
    assert (tmp_path / "d/suid").stat().st_mtime == 1000  # clamped
    inv = staged.inventory
    assert inv.devices == ["/d/null"] and inv.fifos == ["/d/fifo"]
    assert inv.hardlinks == ["/d/link"] and inv.symlinks == ["/d/sym"]
    assert inv.special == ["/d/suid"] and inv.xattrs == ["/d/cap"]
    assert inv.owned == ["/d", "/d/secret"]


def test_fakeroot_state_names_every_inode(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    staged = staging.extract(io.BytesIO(_tar(TREE, DATA)), root, clamp_mtime=0)
    state = tmp_path / "state"
    staging.write_state(staged, state)
    lines = {line.split(",")[1]: line for line in state.read_text().splitlines()}
    null = lines[f"ino={(root / 'd/null').stat().st_ino}"]
    assert f"mode={stat.S_IFCHR | 0o666:o}" in null and f"rdev={os.makedev(1, 3)}" in null
    secret = lines[f"ino={(root / 'd/secret').stat().st_ino}"]
    assert "uid=4000000000,gid=7" in secret and "mode=100000" in secret
    assert len(lines) == len(staged.meta)  # the link adds no line of its own


def test_staging_refuses_a_path_through_a_symlink(tmp_path: Path) -> None:
    evil = [_info("x", tarfile.SYMTYPE, linkname="/tmp"), _info("x/owned")]
    with pytest.raises(TarError, match="through a symlink"):
        staging.extract(io.BytesIO(_tar(evil, {"x/owned": b"!"})), tmp_path, clamp_mtime=0)


def test_plain_staging_for_vfat_writes_only_files_and_dirs(tmp_path: Path) -> None:
    staged = staging.extract(io.BytesIO(_tar(TREE, DATA)), tmp_path, clamp_mtime=0, plain=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["cap", "link", "secret", "suid"]
    warnings = vfat.lost(staged.inventory)
    assert any("1 symlink(s) left out: /d/sym" in w for w in warnings)
    assert any("device node(s) left out" in w for w in warnings)
    assert any("hard link(s) stored as separate copies" in w for w in warnings)


def _filtered(
    export: bytes, *, restore: Mapping[str, bytes] | None = None, clamp_mtime: int | None = None
) -> list[tarfile.TarInfo]:
    out = io.BytesIO()
    write_image_stream(
        io.BytesIO(export), Selection(), [], out, mtime=5, restore=restore, clamp_mtime=clamp_mtime
    )
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        return tar.getmembers()


def test_clamp_lowers_later_mtimes_only() -> None:
    export = _tar(
        [
            _info("old", mtime=100),
            _info("new", mtime=2_000_000_000),
            _info("h", tarfile.LNKTYPE, linkname="new", mtime=2_000_000_000),
        ],
        {"old": b"o", "new": b"n"},
    )
    clamped = {m.name: m.mtime for m in _filtered(export, clamp_mtime=1000)}
    assert clamped == {"old": 100, "new": 1000, "h": 1000}
    unclamped = {m.name: m.mtime for m in _filtered(export)}
    assert unclamped["new"] == 2_000_000_000


def test_engine_etc_files_get_0644_restored_or_not() -> None:
    export = _tar(
        [
            _info("etc", tarfile.DIRTYPE, 0o755),
            _info("etc/hosts", mode=0o755),
            _info("etc/hostname", mode=0o755),
            _info("etc/motd", mode=0o755),
        ],
        {"etc/hosts": b"", "etc/hostname": b"", "etc/motd": b""},
    )
    out = {m.name: m for m in _filtered(export, restore={"/etc/hosts": b"127.0.0.1 x\n"})}
    assert out["etc/hosts"].mode == 0o644 and out["etc/hosts"].size == 12
    assert out["etc/hostname"].mode == 0o644 and out["etc/hostname"].size == 0
    assert out["etc/motd"].mode == 0o755  # not an engine-managed file: untouched


def test_headroom_and_too_small() -> None:
    assert with_headroom(10) == 26  # at least 16 MiB free
    assert with_headroom(400) == 500  # a quarter
    assert with_headroom(90, minimum_mib=109, overhead_mib=80) == 109
    stats = StreamStats(inodes=3, content_bytes=5 << 20)
    check_size("ext4", 10, 10, stats)
    with pytest.raises(
        ScriptError, match="9 MiB is too small for this ext4 image: the content needs about 10 MiB"
    ) as caught:
        check_size("ext4", 9, 10, stats)
    assert caught.value.hint == "set size_mib to 10 or more"


def test_boot_recognises_images_and_finds_kernels(tmp_path: Path) -> None:
    from rfs.vm.qemu import BootSpec, find_kernel, image_type, qemu_argv

    sq = tmp_path / "a.sqfs"
    sq.write_bytes(b"hsqs" + bytes(0x10100))
    assert image_type(sq) == ("squashfs", False)
    ext = tmp_path / "a.ext4"
    ext.write_bytes(bytes(1080) + b"\x53\xef" + bytes(0x10100))
    assert image_type(ext) == ("ext4", True)
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(0x10100))
    with pytest.raises(UsageError, match="no filesystem rfs knows"):
        image_type(junk)
    boot = tmp_path / "boot"
    boot.mkdir()
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64", "initrd.img-6.1.0-10-amd64"):
        (boot / name).write_bytes(b"")
    assert find_kernel(boot) == (
        boot / "vmlinuz-6.1.0-10-amd64",
        boot / "initrd.img-6.1.0-10-amd64",
    )
    argv = qemu_argv(BootSpec(sq), "tcg", boot / "k", None)
    assert "tcg" in argv and "max" in argv
    cmdline = argv[argv.index("-append") + 1]
    assert "root=/dev/vda ro rootfstype=squashfs console=ttyS0" in cmdline
    assert argv[argv.index("-drive") + 1].endswith(",snapshot=on")
