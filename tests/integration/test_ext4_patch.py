"""Overlays written by debugfs into a cached base image give the same tree as the full route.

The export is a tar made here (owners, special bits, hard links, symlinks, devices, a merged
/usr, a capability, odd names), the tools are the real mke2fs and debugfs, and each case is
compared inode by inode (everything `debugfs stat` shows but where the inode sits), hard-link
group by group and byte by byte with the image `mke2fs -d -` makes from the whole stream.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from rfs.errors import EnvironmentProblem, ScriptError
from rfs.fs.assemble import assemble
from rfs.fs.ext4 import assemble_ext4, mkfs_version
from rfs.fs.image import Options
from rfs.fs.overlay import OverlayEntry
from rfs.fs.selection import Selection
from rfs.script.model import FsType
from tests.conftest import require_or_skip
from tests.dircache import DirCache
from tests.fsinspect import assert_same_tree

pytestmark = pytest.mark.integration

SEED = bytes(range(32))
EPOCH = 1_700_000_000
CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def _add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    link: str = "",
    pax: dict[str, str] | None = None,
    device: tuple[int, int] = (0, 0),
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.mtime, info.linkname, info.size = 1_600_000_000, link, len(data)
    info.devmajor, info.devminor = device
    info.pax_headers = pax or {}
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.fixture(scope="module")
def export_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        mkfs_version()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    path = tmp_path_factory.mktemp("export") / "export.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode, uid in (
            ("etc", 0o755, 0),
            ("usr", 0o755, 0),
            ("usr/lib", 0o755, 0),
            ("usr/bin", 0o755, 0),
            ("srv", 0o2775, 1234),
            ("dev", 0o755, 0),
            ("data", 0o700, 70000),
            ("data/sub", 0o755, 0),
        ):
            _add(tar, d, tarfile.DIRTYPE, mode=mode, uid=uid, gid=uid)
        _add(tar, "lib", tarfile.SYMTYPE, link="usr/lib", mode=0o777)
        _add(tar, "etc/hostname", data=b"", mode=0o755)
        _add(tar, "etc/motd", data=b"hello\n", uid=5, gid=6)
        _add(tar, "etc/link-to-motd", tarfile.SYMTYPE, link="motd", mode=0o777)
        _add(tar, "usr/bin/tool", data=b"#!/bin/sh\n" * 300, mode=0o4755)
        _add(tar, "usr/bin/tool2", tarfile.LNKTYPE, link="usr/bin/tool", mode=0o4755)
        _add(tar, "usr/bin/tool3", tarfile.LNKTYPE, link="usr/bin/tool", mode=0o4755)
        # mke2fs gives the inode the fields of the last entry naming it: here the link's.
        _add(tar, "etc/shadow", data=b"root:*:\n", mode=0o640, gid=42)
        _add(tar, "etc/shadow-", tarfile.LNKTYPE, link="etc/shadow", mode=0o600, uid=3)
        _add(
            tar,
            "usr/bin/ping",
            data=b"ping\n",
            mode=0o755,
            pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1")},
        )
        _add(tar, "usr/lib/libx.so", data=b"\x7fELF" + bytes(5000))
        _add(tar, "dev/null", tarfile.CHRTYPE, mode=0o666, device=(1, 3))
        _add(tar, "dev/console", data=b"", mode=0o600)
        _add(tar, "data/secret", data=b"s\n", mode=0o000, uid=70000, gid=80000)
        _add(tar, "data/sub/file", data=b"f\n")
        _add(tar, "srv/café", data=b"cafe\n")
        _add(tar, ".dockerenv", data=b"")
    return path


def _overlay(
    path: str, content: bytes = b"overlay\n", mode: int = 0o644, uid: int = 0, gid: int = 0
) -> OverlayEntry:
    return OverlayEntry(path, content, mode, uid, gid)


def _dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> OverlayEntry:
    return OverlayEntry(path, None, mode, uid, gid, is_dir=True)


def _link(path: str, target: str) -> OverlayEntry:
    return OverlayEntry(path, None, 0o777, symlink=target)


PATCHED = {
    "new file in an existing directory": [_overlay("/etc/resolv.conf", b"nameserver 1\n")],
    "replaces a file, new owner and mode": [_overlay("/etc/motd", b"bye\n", 0o4750, 7, 8)],
    "replaces the first of three hard links": [_overlay("/usr/bin/tool", b"new tool\n")],
    "replaces a later hard link": [_overlay("/usr/bin/tool3", b"third\n", 0o755)],
    "replaces the hard link that set the inode's fields": [_overlay("/etc/shadow-", b"-\n")],
    "replaces the file a differing hard link names": [_overlay("/etc/shadow", b"s\n")],
    "replaces a file with a capability": [_overlay("/usr/bin/ping", b"plain\n", 0o755)],
    "file over a symlink, symlink over a file": [
        _overlay("/etc/link-to-motd"),
        _link("/etc/motd", "/dev/null"),
    ],
    "missing parents are made": [_overlay("/opt/app/deep/conf", b"k=v\n", 0o640, 10, 20)],
    "directory over a directory": [_dir("/data", 0o750, 3, 4), _overlay("/data/new")],
    "through the merged-/usr symlink": [_overlay("/lib/liby.so", b"y\n")],
    "large ids": [_overlay("/srv/big", uid=4_000_000_000, gid=2_147_483_648)],
    "names with spaces and UTF-8": [_overlay("/srv/a b/ça va", b"oui\n")],
    "a long symlink": [_link("/etc/long", "/" + "x" * 200)],
    "the console and a created directory": [
        _overlay("/dev/console", b"", 0o600),
        _dir("/tmp", 0o1777, 0, 0),
    ],
    "an overlay replaced by a later one": [
        _overlay("/etc/twice", b"1\n"),
        _overlay("/etc/twice", b"2\n", 0o600),
    ],
    "a restored file is replaced": [_overlay("/etc/hostname", b"vm\n")],
    "an empty file and a big one": [
        _overlay("/etc/empty", b""),
        _overlay("/srv/big.bin", bytes(range(256)) * 4096),
    ],
    "a file over a directory": [_overlay("/data/sub")],
    "a file over a directory with a subtree": [_overlay("/data", b"flat\n", 0o600, 9, 9)],
    "a symlink over a directory": [_link("/srv", "/data")],
    "a directory over a file": [_dir("/etc/motd", 0o700, 1, 2), _overlay("/etc/motd/inside")],
    "a file in the way of an overlay": [_overlay("/etc/hostname/sub/conf", b"deep\n")],
    "a symlink in the way of an overlay": [_overlay("/etc/link-to-motd/x", b"x\n")],
    "a device in the way of an overlay": [_overlay("/dev/null/x", b"x\n")],
    "a file over a device": [_overlay("/dev/null", b"not null\n", 0o666)],
    "a directory over a hard link": [_dir("/usr/bin/tool2"), _overlay("/usr/bin/tool2/f")],
    "the directory holding hard links is replaced": [_overlay("/usr/bin", b"gone\n")],
}
FULL = {
    "a name debugfs cannot take": ([_overlay('/etc/say "hi"')], "cannot be given the name"),
}
SELECTION = Selection(create_dirs=("/tmp", "/proc"), create_files=("/etc/machine-id",))
RESTORE = {"/etc/hostname": b"from-the-commands\n"}


def _full(export: Path, overlays: list[OverlayEntry], out: Path, size: int = 32) -> None:
    assemble_ext4(
        export,
        SELECTION,
        overlays,
        out,
        size_mib=size,
        seed=SEED,
        source_date_epoch=EPOCH,
        restore=RESTORE,
    )


def _patched(
    export: Path, overlays: list[OverlayEntry], out: Path, cache: DirCache, size: int | None = 32
) -> str:
    options = Options(seed=SEED, source_date_epoch=EPOCH, size_mib=size, base_images=cache)
    result = assemble(FsType.EXT4, export, SELECTION, overlays, out, options, restore=RESTORE)
    return result.route


@pytest.mark.parametrize("case", sorted(PATCHED))
def test_patched_image_has_the_tree_of_the_full_route(
    export_tar: Path, tmp_path: Path, case: str
) -> None:
    cache = DirCache(tmp_path)
    _full(export_tar, PATCHED[case], tmp_path / "full.ext4")
    route = _patched(export_tar, PATCHED[case], tmp_path / "patched.ext4", cache)
    assert route.startswith("cached base image + debugfs"), route
    assert cache.made == 1
    assert_same_tree(tmp_path / "full.ext4", tmp_path / "patched.ext4")


@pytest.mark.parametrize("case", sorted(FULL))
def test_what_cannot_be_patched_exactly_takes_the_full_route(
    export_tar: Path, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    overlays, reason = FULL[case]
    _full(export_tar, overlays, tmp_path / "full.ext4")
    with caplog.at_level("INFO", logger="rfs.fs"):
        route = _patched(export_tar, overlays, tmp_path / "patched.ext4", DirCache(tmp_path))
    assert route == "tar stream → mke2fs -d -"
    assert reason in caplog.text
    assert (tmp_path / "patched.ext4").read_bytes() == (tmp_path / "full.ext4").read_bytes()


def test_base_image_is_made_once_and_patches_are_reproducible(
    export_tar: Path, tmp_path: Path
) -> None:
    cache = DirCache(tmp_path)
    first = PATCHED["new file in an existing directory"]
    second = PATCHED["replaces the first of three hard links"]
    _patched(export_tar, first, tmp_path / "a.ext4", cache)
    _patched(export_tar, second, tmp_path / "b.ext4", cache)
    _patched(export_tar, first, tmp_path / "c.ext4", cache)
    assert cache.made == 1  # the overlay edits reused the base image
    assert (tmp_path / "a.ext4").read_bytes() == (tmp_path / "c.ext4").read_bytes()
    assert list(tmp_path.glob("*.part")) == []
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # no temp file left


def test_the_image_uuid_is_its_own_not_the_base_images(export_tar: Path, tmp_path: Path) -> None:
    cache = DirCache(tmp_path)
    _patched(export_tar, [], tmp_path / "a.ext4", cache)
    other = bytes(reversed(SEED))
    options = Options(seed=other, source_date_epoch=EPOCH, size_mib=32, base_images=cache)
    assemble(FsType.EXT4, export_tar, SELECTION, [], tmp_path / "b.ext4", options, restore=RESTORE)
    assert cache.made == 1

    def fs_uuid(image: Path) -> str:
        out = subprocess.run(
            ["dumpe2fs", "-h", str(image)], check=True, capture_output=True, text=True
        ).stdout
        return next(
            line.split()[-1] for line in out.splitlines() if line.startswith("Filesystem UUID")
        )

    assert fs_uuid(tmp_path / "a.ext4") != fs_uuid(tmp_path / "b.ext4")
    for image in ("a.ext4", "b.ext4"):
        subprocess.run(["e2fsck", "-fn", str(tmp_path / image)], check=True, capture_output=True)


def test_an_overlay_that_does_not_fit_names_the_size(export_tar: Path, tmp_path: Path) -> None:
    cache = DirCache(tmp_path)
    _patched(export_tar, [], tmp_path / "a.ext4", cache, size=2)
    with pytest.raises(ScriptError) as caught:
        _patched(
            export_tar,
            [_overlay("/srv/huge", b"\xa5" * (3 << 20))],
            tmp_path / "a.ext4",
            cache,
            size=2,
        )
    assert "size_mib" in str(caught.value.problems[0])
    assert (tmp_path / "a.ext4").exists()  # the previous image is left alone
    assert sorted(p.name for p in tmp_path.glob(".*")) == []
