"""rfs/fs/ext4.py: an ext4 image made by mke2fs from an export tarball (no engine), read back
with debugfs; the options handed to mke2fs; a too-small size refused naming the size needed,
which then suffices; the size estimate's arithmetic."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from rfs.errors import RfsError, ScriptError
from rfs.fs.ext4 import _journal_blocks, _user_args, assemble_ext4, required_size_mib
from rfs.fs.tarstream import Selection, StreamStats

SEED = bytes(range(32))
EPOCH = 1_700_000_000


def export(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return done.stdout


def test_an_image_of_the_export(tmp_path: Path) -> None:
    tar = export(tmp_path / "export.tar", {"etc/hostname": b"rfs\n", "bin/sh": b"#!x\n"})
    out = tmp_path / "image.ext4"
    stats = assemble_ext4(
        tar,
        Selection(),
        [],
        out,
        size_mib=8,
        seed=SEED,
        source_date_epoch=EPOCH,
        mkfs_args=["-L", "rootfs", "-E", "lazy_itable_init=1"],
    )
    assert out.stat().st_size == 8 << 20
    assert stats.from_export == 2
    assert debugfs(out, "cat /etc/hostname") == "rfs\n"
    stats_text = debugfs(out, "stats")
    assert "Filesystem volume name:   rootfs" in stats_text
    assert "00010203-0405-4607-8809-0a0b0c0d0e0f" in stats_text  # the UUID comes from the seed
    again = tmp_path / "again.ext4"
    assemble_ext4(
        tar,
        Selection(),
        [],
        again,
        size_mib=8,
        seed=SEED,
        source_date_epoch=EPOCH,
        mkfs_args=["-L", "rootfs", "-Elazy_itable_init=1"],
    )
    assert again.read_bytes() == out.read_bytes()  # reproducible


def test_too_small_names_the_size_that_suffices(tmp_path: Path) -> None:
    tar = export(tmp_path / "export.tar", {"big": b"\x01" * (6 << 20), "small": b"x"})
    out = tmp_path / "image.ext4"
    with pytest.raises(ScriptError) as caught:
        assemble_ext4(tar, Selection(), [], out, size_mib=4, seed=SEED, source_date_epoch=EPOCH)
    (problem,) = caught.value.problems
    assert problem.path == "filesystem.size_mib"
    assert problem.message.startswith("4 MiB is too small for this ext4 image")
    assert not out.exists()  # nothing left behind
    hint = caught.value.hint or ""
    need = int(hint.split("set size_mib to ")[1].split()[0])
    assert need > 6
    assemble_ext4(tar, Selection(), [], out, size_mib=need, seed=SEED, source_date_epoch=EPOCH)
    assert debugfs(out, "stat /big").count("Size: 6291456") == 1


def test_refused_arguments(tmp_path: Path) -> None:
    tar = export(tmp_path / "export.tar", {"f": b"x"})
    out = tmp_path / "image.ext4"
    with pytest.raises(RfsError, match="seed must be 32 bytes"):
        assemble_ext4(tar, Selection(), [], out, size_mib=8, seed=b"x", source_date_epoch=0)
    with pytest.raises(ScriptError, match="must be at least 1"):
        assemble_ext4(tar, Selection(), [], out, size_mib=0, seed=SEED, source_date_epoch=0)
    extended: list[str] = []
    assert _user_args(["-L", "x", "-E", "a=1", "-Eb=2", "-m", "0"], extended) == [
        "-L",
        "x",
        "-m",
        "0",
    ]
    assert extended == ["a=1", "b=2"]
    with pytest.raises(ScriptError, match="-E needs a value"):
        _user_args(["-E"], [])
    with pytest.raises(ScriptError, match="-d is set by rfs"):
        _user_args(["-d", "/somewhere"], [])


def test_size_estimate() -> None:
    assert _journal_blocks(1000) == 0
    assert _journal_blocks(4096) == 1024
    assert _journal_blocks(100_000) == 4096
    assert _journal_blocks(1 << 40) == 262144
    small = required_size_mib(StreamStats(inodes=10, data_blocks=10))
    big = required_size_mib(StreamStats(inodes=10, data_blocks=(100 << 20) // 4096))
    many = required_size_mib(StreamStats(inodes=100_000, data_blocks=10))
    assert 1 <= small < 8
    assert 100 < big < 120  # the data plus its overhead, not much more
    assert many > small  # inodes need room too


@pytest.mark.parametrize(
    ("args", "deferred"),
    [
        ((), True),
        (("-L", "rootfs", "-E", "lazy_itable_init=1"), True),
        (("-O", "^metadata_csum"), False),
        (("-O^has_journal",), False),
        (("-t", "ext2"), False),
        (("-T", "small"), False),
        (("-r", "0"), False),
    ],
)
def test_checksums_are_added_after_mke2fs_only_when_the_user_chose_no_features(
    args: tuple[str, ...], deferred: bool
) -> None:
    from rfs.fs.ext4checksums import LARGE_FILE_BYTES, deferrable

    assert deferrable(args, LARGE_FILE_BYTES + 1) is deferred
    assert not deferrable(args, LARGE_FILE_BYTES)  # no large file: mke2fs's usual route


def test_the_conf_without_checksums_lacks_only_them() -> None:
    from rfs.fs.ext4 import mke2fs_conf

    full, without = mke2fs_conf(), mke2fs_conf(checksums=False)
    assert "metadata_csum" in full and "metadata_csum" not in without
    assert full.replace("metadata_csum,metadata_csum_seed,", "") == without


def test_checksums_that_cannot_be_added_after_are_made_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real tools, with the step after mke2fs failing as e2fsck does in a full image.
    from rfs.fs import ext4
    from rfs.fs.ext4checksums import LARGE_FILE_BYTES

    def fails(image: Path, epoch: int) -> None:
        raise RfsError("e2fsck -fyD (directory checksums) failed (exit 4): no room")

    monkeypatch.setattr(ext4, "add_checksums", fails)
    tar = export(tmp_path / "export.tar", {"etc/hostname": b"rfs\n", "bin/sh": b"#!x\n"})
    output = tmp_path / "fallback.ext4"
    assemble_ext4(
        tar,
        Selection(),
        [],
        output,
        size_mib=8,
        seed=SEED,
        source_date_epoch=EPOCH,
        largest_file=LARGE_FILE_BYTES + 1,
    )
    assert (
        "metadata_csum" in debugfs(output, "stats").split("Filesystem features:")[1].split("\n")[0]
    )
    check = subprocess.run(["e2fsck", "-fn", str(output)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.tar", "fallback.ext4"]


def test_an_interrupt_while_mke2fs_reads_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real mke2fs, with the filter that feeds it interrupted after its first 64 KiB.
    from typing import Any, BinaryIO

    from rfs.fs import image as fs_image

    def interrupted(src: BinaryIO, *args: Any, **kwargs: Any) -> StreamStats:
        out: BinaryIO = args[2]
        out.write(src.read(1 << 16))
        raise KeyboardInterrupt

    monkeypatch.setattr(fs_image, "write_image_stream", interrupted)
    work = tmp_path / "work"
    work.mkdir()
    tar = export(tmp_path / "export.tar", {"etc/hostname": b"rfs\n", "srv/data": bytes(1 << 20)})
    with pytest.raises(KeyboardInterrupt):
        assemble_ext4(
            tar,
            Selection(),
            [],
            work / "never.ext4",
            size_mib=8,
            seed=SEED,
            source_date_epoch=EPOCH,
        )
    assert list(work.iterdir()) == []
