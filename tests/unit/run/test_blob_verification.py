"""A cached blob is reread only when its file changed since the store last hashed it, and
`rfs cache verify` rereads everything (#16: warm builds cost what changed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rfs.cli import main
from rfs.run import store as store_module
from rfs.run.store import Store
from tests.spies import paths_passed


def _store_with_blob(root: Path, data: bytes = b"x" * 4096) -> tuple[Store, str]:
    store = Store(root)
    key = "ab" * 32
    with store.write_blob(key) as writer:
        writer.write(data)
    store.put_record(
        key, {"kind": "export", "blob_size": writer.size, "blob_digest": writer.digest}
    )
    return store, key


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    import rfs.host.hashing as hashing

    return paths_passed(monkeypatch, hashing, "digest_file")


def test_a_blob_written_by_the_store_is_not_reread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, key = _store_with_blob(tmp_path)
    reads = _count_hashes(monkeypatch)
    blob = store.blob(key)
    assert blob is not None
    assert store.verify_blob(blob, key)
    assert store.verify_blob(blob, key)
    assert reads == []
    assert store.verify_blob(blob)  # without the key: always read
    assert reads == [blob.path]


def test_a_rewrite_with_the_same_size_and_mtime_is_reread_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, key = _store_with_blob(tmp_path)
    blob = store.blob(key)
    assert blob is not None
    st = blob.path.stat()
    with blob.path.open("r+b") as f:  # same size, and the mtime put back: only ctime moves
        f.write(b"y")
    os.utime(blob.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    reads = _count_hashes(monkeypatch)
    assert not store.verify_blob(blob, key)
    assert reads == [blob.path]


def test_a_file_put_in_its_place_is_reread(tmp_path: Path) -> None:
    store, key = _store_with_blob(tmp_path)
    blob = store.blob(key)
    assert blob is not None
    other = tmp_path / "other"
    other.write_bytes(b"z" * 4096)
    os.replace(other, blob.path)
    assert not store.verify_blob(blob, key)


def test_a_found_digest_is_remembered_and_a_drop_forgets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, key = _store_with_blob(tmp_path)
    store._index.delete(store_module._VERIFIED + key)  # as if written by an older rfs
    blob = store.blob(key)
    assert blob is not None
    reads = _count_hashes(monkeypatch)
    assert store.verify_blob(blob, key)
    assert store.verify_blob(blob, key)
    assert reads == [blob.path]
    store.drop(key)
    assert store._index.get(store_module._VERIFIED + key) is None


def test_cache_verify_drops_what_changed_behind_the_memo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, key = _store_with_blob(tmp_path)
    good = "cd" * 32
    with store.write_blob(good) as writer:
        writer.write(b"fine")
    store.put_record(good, {"kind": "export", "blob_size": 4, "blob_digest": writer.digest})
    blob = store.blob(key)
    assert blob is not None
    # A change the memo cannot see: the remembered identity is made to match the bad file.
    with blob.path.open("r+b") as f:
        f.write(b"y")
    st = blob.path.stat()
    store._index.set(
        store_module._VERIFIED + key,
        {"id": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns], "digest": blob.digest},
    )
    assert store.verify_blob(blob, key)  # the memo is trusted
    store.close()
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"damaged: {key}" in out
    assert "checked 2 files, dropped 1 damaged" in out
    reopened = Store(tmp_path)
    assert reopened.record(key) is None
    assert reopened.record(good) is not None
