"""rfs/fs/assemble.py and the drivers behind it (ext4, btrfs, xfs, vfat, squashfs, erofs):
each image type made from an export tarball by its own mkfs (no engine), sized from the
content, passing its type's checker, and where a tool reads files without mounting, holding
the export's bytes; the warnings an assembly gives."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from rfs.errors import RfsError
from rfs.fs.assemble import assemble, tool_version, verify
from rfs.fs.image import Options
from rfs.fs.tarstream import Selection
from rfs.script.model import FsType

SEED = bytes(range(32))
HOSTNAME = b"rfs-test\n"


def export(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in [
            ("etc", tarfile.DIRTYPE, b""),
            ("etc/hostname", tarfile.REGTYPE, HOSTNAME),
            ("bin", tarfile.DIRTYPE, b""),
            ("bin/tool", tarfile.REGTYPE, b"\x7fELF" + bytes(range(256)) * 64),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode = kind, len(data), 0o755
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def read_back(fs_type: FsType, image: Path, path: str) -> bytes | None:
    """The file at `path` of `image`, read without mounting, or None if no tool here can."""
    if fs_type is FsType.EXT4:
        argv = ["debugfs", "-R", f"cat {path}", str(image)]
    elif fs_type is FsType.SQUASHFS and shutil.which("unsquashfs"):
        argv = ["unsquashfs", "-cat", str(image), path]
    elif fs_type is FsType.VFAT and shutil.which("mtype"):
        argv = ["mtype", "-i", str(image), f"::{path}"]
    else:
        return None
    return subprocess.run(argv, capture_output=True, check=True).stdout


@pytest.mark.parametrize("fs_type", list(FsType), ids=lambda t: t.value)
def test_each_type_from_an_export(tmp_path: Path, fs_type: FsType) -> None:
    try:
        tool_version(fs_type)
    except RfsError as exc:
        pytest.skip(f"no {fs_type.value} tools here: {exc.message}")
    out = tmp_path / f"image.{fs_type.value}"
    warned: list[str] = []
    result = assemble(
        fs_type,
        export(tmp_path / "export.tar"),
        Selection(),
        [],
        out,
        Options(seed=SEED, source_date_epoch=1_700_000_000),
        warn=warned.append,
    )
    assert out.is_file() and result.stats.from_export == 4
    assert result.size_mib >= 1 and out.stat().st_size <= result.size_mib << 20
    assert warned == result.warnings
    verify(fs_type, out)  # the type's own checker finds nothing wrong
    content = read_back(fs_type, out, "/etc/hostname")
    if content is not None:
        assert content.replace(b"\r\n", b"\n") == HOSTNAME


def test_warnings_and_a_bad_seed(tmp_path: Path) -> None:
    tar = export(tmp_path / "export.tar")
    out = tmp_path / "image.ext4"
    selection = Selection(whole=False, include_dirs=("/etc", "/nowhere"))
    options = Options(seed=SEED, size_mib=8, dd_args=("bs=1M",))
    result = assemble(FsType.EXT4, tar, selection, [], out, options)
    assert result.warnings == [
        "filesystem.dd_args ['bs=1M'] ignored: rfs writes a sparse image file without dd",
        "export include /nowhere matched nothing in the container filesystem",
    ]
    assert result.size_mib == 8 and out.stat().st_size == 8 << 20
    assert read_back(FsType.EXT4, out, "/etc/hostname") == HOSTNAME
    assert read_back(FsType.EXT4, out, "/bin/tool") == b""  # not selected
    with pytest.raises(RfsError, match="seed must be 32 bytes"):
        assemble(FsType.EXT4, tar, Selection(), [], out, Options(seed=b"short"))


def test_a_copied_image_keeps_its_bytes_and_its_holes(tmp_path: Path) -> None:
    from rfs.fs.image import copy_sparse

    source = tmp_path / "base.img"
    with source.open("wb") as f:
        f.truncate(64 << 20)
        for offset in (0, 17 << 20, (64 << 20) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    target = tmp_path / "copy.img"
    copy_sparse(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_blocks * 512 < 1 << 20  # 12 KiB of data, not 64 MiB written
