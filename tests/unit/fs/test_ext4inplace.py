"""Overlay edits patch the output in place (rfs.fs.ext4inplace), with the real e2fsprogs: the
route choice, the rollback and its verification, and that every route gives the same bytes."""

from __future__ import annotations

import fcntl
import filecmp
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import RfsError
from rfs.fs import ext4inplace, ext4ops, ext4patch
from rfs.fs.assemble import assemble
from rfs.fs.ext4inplace import RollbackFailed, Slot, same_bytes, undo_ranges
from rfs.fs.image import Options
from rfs.fs.overlay import OverlayEntry
from rfs.fs.selection import Selection
from rfs.script.model import FsType
from tests.dircache import DirCache

SEED = bytes(range(32))
EPOCH = 1_700_000_000


class UndoCache(DirCache):
    """Base images and their undo directories in a directory (the build uses its store)."""

    def base(self) -> Path:
        (found,) = [p for p in self.root.iterdir() if p.is_file()]
        return found

    def slot(self, output: Path) -> Slot:
        (directory,) = [p for p in (self.root / "side").iterdir() if p.is_dir()]
        return Slot.of(directory, output)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "export.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/motd", b"hello\n"), ("srv/data", bytes(range(256)) * 64)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def _overlays(version: int) -> list[OverlayEntry]:
    if version == 0:
        return []
    entries = [OverlayEntry("/etc/app.conf", f"v{version}\n".encode() * version, 0o644, 0, 0)]
    if version % 2:
        entries.append(OverlayEntry("/opt/x/y", b"deep\n", 0o600, 5, 6))
    return entries


def _build(export: Path, out: Path, cache: UndoCache, version: int) -> str:
    options = Options(seed=SEED, source_date_epoch=EPOCH, size_mib=16, base_images=cache)
    result = assemble(FsType.EXT4, export, Selection(), _overlays(version), out, options)
    return result.route


def _clean(export: Path, tmp_path: Path, version: int) -> Path:
    """The image a build with an empty cache and no previous output makes."""
    where = tmp_path / f"clean-{version}"
    where.mkdir(exist_ok=True)
    out = where / "image.ext4"
    if not out.exists():
        _build(export, out, UndoCache(where / "cache"), version)
    return out


def test_edits_and_reverts_patch_in_place_with_the_bytes_of_a_clean_build(
    export: Path, tmp_path: Path
) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    assert "in place" not in _build(export, out, cache, 1)  # first build: the copy route
    inode = out.stat().st_ino
    for version in (2, 3, 0, 3, 1):
        route = _build(export, out, cache, version)
        assert "debugfs in place" in route, route
        assert out.stat().st_ino == inode
        assert filecmp.cmp(out, _clean(export, tmp_path, version), shallow=False), version


def test_rollback_gives_back_the_base_image_byte_for_byte(export: Path, tmp_path: Path) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 3)
    slot = cache.slot(out)
    assert slot.usable() is None
    ranges = undo_ranges(slot.file("undo"), out.stat().st_size)
    assert any(offset == 0 for offset, _ in ranges)  # the superblock's block is covered
    assert not filecmp.cmp(out, cache.base(), shallow=False)
    ext4inplace.roll_back(slot, cache.base())
    assert filecmp.cmp(out, cache.base(), shallow=False)  # UUID, bitmaps, tables: all back
    ext4inplace.restore(slot, None)  # and forward again: the previous image
    assert filecmp.cmp(out, _clean(export, tmp_path, 3), shallow=False)
    assert slot.usable() is None


@pytest.mark.parametrize("change", ["touch", "truncate", "replace", "append", "symlink"])
def test_an_output_changed_by_someone_else_takes_the_copy_route(
    export: Path, tmp_path: Path, change: str
) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    if change == "touch":
        os.utime(out, ns=(0, out.stat().st_mtime_ns + 1))
    elif change == "truncate":
        os.truncate(out, out.stat().st_size // 2)
    elif change == "replace":
        (tmp_path / "other").write_bytes(out.read_bytes())
        os.replace(tmp_path / "other", out)
    elif change == "symlink":  # the same image, now behind a symlink
        os.rename(out, tmp_path / "moved.ext4")
        out.symlink_to(tmp_path / "moved.ext4")
    else:
        with out.open("ab") as f:
            f.write(b"x")
    assert cache.slot(out).usable() == "the output changed since rfs wrote it"
    assert "in place" not in _build(export, out, cache, 2)
    assert filecmp.cmp(out, _clean(export, tmp_path, 2), shallow=False)
    assert "in place" in _build(export, out, cache, 3)  # and in place again from there


def test_route_choice_names_what_is_missing(export: Path, tmp_path: Path) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    slot = cache.slot(out)
    os.link(out, tmp_path / "kept.ext4")  # a copy kept by hard link is not patched
    assert slot.usable() is not None  # (the new link changed the ctime)
    _build(export, out, cache, 2)
    assert slot.usable() is None
    assert out.stat().st_ino != (tmp_path / "kept.ext4").stat().st_ino
    slot.file("patching").write_bytes(b"")  # a SIGKILL during a patch
    assert slot.usable() == "an earlier in-place patch of the output did not finish"
    slot.file("patching").unlink()
    slot.file("undo").unlink()
    assert slot.usable() == "the undo file is missing"
    slot.file("state").write_text("{not json")
    assert (slot.usable() or "").startswith("the in-place state is unreadable")
    slot.file("state").unlink()
    assert slot.usable() == "rfs did not write the output from this base image"
    assert Slot.of(slot.directory, tmp_path / "other").usable() is not None


def test_a_marker_left_by_a_crash_makes_the_next_build_rewrite(
    export: Path, tmp_path: Path
) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    slot = cache.slot(out)
    slot.file("patching").write_bytes(b"")
    with out.open("r+b") as f:  # what a half-done patch leaves
        f.seek(1024)
        f.write(bytes(1024))
    inode = out.stat().st_ino
    assert "in place" not in _build(export, out, cache, 2)
    assert out.stat().st_ino != inode
    assert filecmp.cmp(out, _clean(export, tmp_path, 2), shallow=False)
    assert not slot.file("patching").exists()


def test_a_damaged_undo_file_takes_the_copy_route(export: Path, tmp_path: Path) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    previous = out.read_bytes()
    undo = cache.slot(out).file("undo")
    data = bytearray(undo.read_bytes())
    data[-100] ^= 0xFF  # a block's content: its checksum no longer matches
    undo.write_bytes(bytes(data))
    with pytest.raises(RollbackFailed):
        ext4inplace.roll_back(cache.slot(out), cache.base())
    assert out.read_bytes() == previous  # e2undo refused before writing
    assert "in place" not in _build(export, out, cache, 2)
    assert filecmp.cmp(out, _clean(export, tmp_path, 2), shallow=False)


def test_a_rollback_that_does_not_give_the_base_is_undone(export: Path, tmp_path: Path) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    previous = out.read_bytes()
    base = cache.base()
    other = tmp_path / "other-base"
    other.write_bytes(base.read_bytes())
    with other.open("r+b") as f:  # a base image that differs in a block the undo restores
        f.seek(1024 + 0x68)
        f.write(b"\x01" * 16)
    with pytest.raises(RollbackFailed, match="differs from the base image"):
        ext4inplace.roll_back(cache.slot(out), other)
    assert out.read_bytes() == previous
    assert cache.slot(out).usable() is None


def test_an_interrupt_while_patching_restores_the_previous_image(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    before = out.stat()
    previous = out.read_bytes()
    real = ext4patch.apply_patch

    def interrupted(image: Path, patch: ext4ops.Patch, **kwargs: Any) -> None:
        real(image, patch, **kwargs)
        if image == out:  # the SIGTERM held back while debugfs ran arrives now
            raise KeyboardInterrupt

    monkeypatch.setattr(ext4patch, "apply_patch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(export, out, cache, 2)
    after = out.stat()
    assert out.read_bytes() == previous
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    monkeypatch.setattr(ext4patch, "apply_patch", real)
    slot = cache.slot(out)
    assert slot.usable() is None
    assert sorted(p.suffix for p in slot.directory.iterdir()) == [".pickle", ".state", ".undo"]
    assert "in place" in _build(export, out, cache, 2)
    assert filecmp.cmp(out, _clean(export, tmp_path, 2), shallow=False)


def test_a_failed_patch_restores_the_previous_image(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = UndoCache(tmp_path / "cache")
    out = tmp_path / "image.ext4"
    _build(export, out, cache, 1)
    previous = out.read_bytes()
    slot = cache.slot(out)

    def fails(undo: Path) -> None:
        raise RfsError(f"debugfs failed ({undo.name})")

    with pytest.raises(RfsError, match="debugfs failed"):
        ext4inplace.patch_in_place(slot, cache.base(), fails, "digest")
    assert out.read_bytes() == previous
    assert slot.usable() is None


def _undo_file(path: Path, keys: list[tuple[int, int]], magic: int = 0xCADECADE) -> None:
    block = 4096
    header = struct.pack("<8sQQQII", b"E2UNDO02", len(keys), 1, 2, block, block)
    key_block = struct.pack("<IIQ", magic, 0, 0) + b"".join(
        struct.pack("<QII", fs_block, 0, size) for fs_block, size in keys
    )
    data = sum(-(-size // block) for _, size in keys)
    path.write_bytes(header.ljust(2 * block, b"\0") + key_block.ljust(block, b"\0") + bytes(data))


def test_undo_ranges_reads_the_keys_and_refuses_what_is_not_an_undo_file(
    tmp_path: Path,
) -> None:
    undo = tmp_path / "undo"
    _undo_file(undo, [(0, 4096), (10, 8192)])
    assert undo_ranges(undo, 1 << 20) == [(0, 4096), (40960, 8192)]
    with pytest.raises(RollbackFailed, match="outside the image"):
        undo_ranges(undo, 40960)
    _undo_file(undo, [(0, 4096)], magic=0x1234)
    with pytest.raises(RollbackFailed, match="damaged key block"):
        undo_ranges(undo, 1 << 20)
    undo.write_bytes(b"E2UNDO01" + bytes(100))
    with pytest.raises(RollbackFailed, match="not an undo file"):
        undo_ranges(undo, 1 << 20)
    undo.write_bytes(b"short")
    with pytest.raises(RollbackFailed, match="too short"):
        undo_ranges(undo, 1 << 20)
    with pytest.raises(RollbackFailed, match="cannot read"):
        undo_ranges(tmp_path / "missing", 1 << 20)


def test_same_bytes_compares_size_head_and_ranges(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(3 << 20))
    b.write_bytes(bytes(3 << 20))
    assert same_bytes(a, b, [(1 << 20, 2 << 20)])
    with b.open("r+b") as f:
        f.seek((3 << 20) - 1)
        f.write(b"\1")
    assert not same_bytes(a, b, [(1 << 20, 2 << 20)])
    assert same_bytes(a, b, [(8192, 4096)])  # outside what is compared
    b.write_bytes(bytes(4096))
    assert not same_bytes(a, b, [])


def test_builds_into_one_output_take_turns(tmp_path: Path) -> None:
    out = tmp_path / "image.ext4"
    one, other = Slot.of(tmp_path / "undo" / "a", out), Slot.of(tmp_path / "undo" / "b", out)
    with one.locked():
        fd = os.open(tmp_path / "undo" / f"{other.name}.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the same lock, whichever base image
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with other.locked():
        pass


def test_the_exports_headers_are_kept_beside_the_base_image(export: Path, tmp_path: Path) -> None:
    side = tmp_path / "side"
    parsed = ext4patch.export_entries(export, side)
    assert [e.name for e in parsed] == [b"etc/motd", b"srv/data"]
    (kept,) = side.iterdir()
    moved = tmp_path / "moved.tar"
    export.rename(moved)  # an overlay edit does not read the export again
    assert ext4patch.export_entries(export, side) == parsed
    kept.write_bytes(b"\x80\x04damaged")
    assert ext4patch.export_entries(moved, side) == parsed  # parsed again, and kept again
    assert ext4patch.export_entries(tmp_path / "gone.tar", side) == parsed
    kept.write_bytes(pickle.dumps(["not", "entries"]))
    with pytest.raises(FileNotFoundError):
        ext4patch.export_entries(tmp_path / "gone.tar", side)
