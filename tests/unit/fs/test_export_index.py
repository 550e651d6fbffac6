"""An export's headers are parsed once per process and file: the diff steps of a cold build,
its assembly and the filter all read the same anchor export (rfs.fs.ext4patch.export_index,
rfs.fs.tarformat.index_file). A rewritten file, or a damaged kept copy, is parsed again."""

from __future__ import annotations

import io
import mmap
import os
import tarfile
from pathlib import Path

import pytest

from rfs.fs import ext4patch
from rfs.fs import tarformat as tf
from rfs.fs.plantree import Header
from tests.spies import paths_passed

Index = tuple[list[tf.RawEntry], list[Header]]


def _write_tar(path: Path, names: list[str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            data = name.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # a new inode, as the store writes blobs


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The exports ext4patch parsed (rather than took from memory or a kept copy)."""
    return paths_passed(monkeypatch, ext4patch, "_parse")


def _names(index: Index) -> list[bytes]:
    return [e.name for e in index[0]]


def test_a_second_reader_of_the_same_export_does_not_parse_it(
    tmp_path: Path, parses: list[Path]
) -> None:
    export = tmp_path / "export.tar"
    _write_tar(export, ["etc/a", "etc/b"])
    first = ext4patch.export_index(export, tmp_path / "anchor-side")
    second = ext4patch.export_index(export, tmp_path / "base-side")
    assert parses == [export]
    assert _names(first) == _names(second) == [b"etc/a", b"etc/b"]
    # Each side directory keeps its copy, for later builds (another process).
    assert (tmp_path / "base-side" / ext4patch._ENTRIES).is_file()
    assert (tmp_path / "anchor-side" / ext4patch._ENTRIES).is_file()


def test_a_rewritten_export_is_parsed_again(tmp_path: Path, parses: list[Path]) -> None:
    export = tmp_path / "export.tar"
    _write_tar(export, ["etc/a"])
    ext4patch.export_index(export, tmp_path / "side-1")
    _write_tar(export, ["etc/a", "etc/new"])
    again = ext4patch.export_index(export, tmp_path / "side-2")
    assert parses == [export, export]
    assert _names(again) == [b"etc/a", b"etc/new"]


def test_a_damaged_kept_copy_is_replaced(tmp_path: Path, parses: list[Path]) -> None:
    export = tmp_path / "export.tar"
    _write_tar(export, ["etc/a"])
    side = tmp_path / "side"
    side.mkdir()
    (side / ext4patch._ENTRIES).write_bytes(b"not a pickle")
    index = ext4patch.export_index(export, side)
    assert parses == [export]
    assert _names(index) == [b"etc/a"]
    assert ext4patch._load(side / ext4patch._ENTRIES, None) is not None


def test_index_file_remembers_by_identity(tmp_path: Path) -> None:
    path = tmp_path / "export.tar"
    _write_tar(path, ["a", "b"])

    def index() -> list[bytes]:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return [e.name for e in tf.index_file(f.fileno(), view)]

    assert index() == [b"a", b"b"]
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
    assert (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) in tf._INDEXED
    _write_tar(path, ["a", "b", "c"])
    assert index() == [b"a", b"b", b"c"]


def test_a_kept_copy_of_other_content_is_not_used(tmp_path: Path, parses: list[Path]) -> None:
    """A step run again (--rebuild, --no-cache) can write other bytes under its key, and so
    into the same side directory: the kept headers name the content they were parsed from."""
    side = tmp_path / "side"
    export = tmp_path / "export.tar"
    _write_tar(export, ["etc/old"])
    assert _names(ext4patch.export_index(export, side, "digest-1")) == [b"etc/old"]
    again = tmp_path / "again.tar"  # the new blob: another file, same key, same side dir
    _write_tar(again, ["etc/new"])
    assert _names(ext4patch.export_index(again, side, "digest-2")) == [b"etc/new"]
    assert _names(ext4patch.export_index(again, side, "digest-2")) == [b"etc/new"]
    assert parses == [export, again]  # the second read of `again` took the kept copy
    # Without a digest (a base image's side directory is keyed by the content) it is used.
    assert ext4patch._load(side / ext4patch._ENTRIES, None) is not None
