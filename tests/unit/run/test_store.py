"""The local store: eviction order, entries in use, per-key build locks, statistics."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rfs.run.store import Store


class Clock:
    """The stores' clock here: one second later at each reading, so every stamp is distinct
    and stamps follow the order of the calls (the LRU order), without sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def add(store: Store, key: str, size: int = 0, kind: str = "export") -> None:
    record: dict[str, object] = {"kind": kind}
    if size:
        with store.write_blob(key) as w:
            w.write(b"x" * size)
        record.update(blob_size=w.size, blob_digest=w.digest)
    store.put_record(key, record)


def test_prune_drops_least_recently_used_until_it_fits(tmp_path: Path) -> None:
    store = Store(tmp_path, clock=Clock())
    for key in ("a", "b", "c"):
        add(store, key, 8192)  # whole 4 KiB blocks: the limit counts what is allocated
    store.touch("a")  # now the most recently used
    dropped = store.prune(max_size=16384)
    assert [k for k, _ in dropped] == ["b"]
    assert store.blob_bytes() == 16384 and store.record("b") is None
    assert not (tmp_path / "blobs" / "b").exists()
    dropped = store.prune(max_size=8192)
    assert [k for k, _ in dropped] == ["c"]


def test_a_sparse_blob_counts_what_it_allocates(tmp_path: Path) -> None:
    from rfs.host.hashing import digest_sparse_file

    store = Store(tmp_path)
    with store.blob_file("img") as tmp:
        with tmp.open("wb") as f:
            f.truncate(1 << 30)
            f.seek(1 << 20)
            f.write(b"data" * 1024)
        digest = digest_sparse_file(tmp)
    store.put_record(
        "img",
        {"kind": "ext4-base", "blob_size": 1 << 30, "blob_digest": digest, "blob_sparse": True},
    )
    assert store.blob_bytes() < 1 << 20  # a 1 GiB image with 4 KiB of data
    blob = store.blob("img")
    assert blob is not None and store.verify_blob(blob)
    with (tmp_path / "blobs" / "img").open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"DATA")
    assert not store.verify_blob(blob)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_killed_builds_partial_writes_are_removed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    gone = _dead_pid()
    for name in (f"part-{gone}-k1", f".part-{gone}-k1.rfs-tmp-{gone}-x", f"part-{os.getpid()}-k2"):
        (tmp_path / "tmp" / name).write_bytes(b"x")
    store.remove_parts()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [f"part-{os.getpid()}-k2"]


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_prune_by_age_and_clear(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, clock=clock)
    add(store, "old", 10)
    clock.now += 600  # ten minutes pass
    add(store, "new", 10, kind="run")
    assert [k for k, _ in store.prune(older_than=300)] == ["old"]
    assert [k for k, _ in store.prune()] == ["new"]  # neither limit: everything
    assert list(store.records()) == []


def test_entries_in_use_by_another_build_are_never_dropped(tmp_path: Path) -> None:
    running = Store(tmp_path, clock=Clock())  # a build in progress holds its steps
    add(running, "used", 100)
    add(running, "idle", 100)
    running.hold({"used"})
    other = Store(tmp_path, clock=Clock())  # another process's prune
    dropped = other.prune()
    assert [k for k, _ in dropped] == ["idle"]
    assert other.record("used") is not None and other.blob("used") is not None
    running.close()  # the build ended
    assert [k for k, _ in other.prune()] == ["used"]
    assert list((tmp_path / "locks").iterdir()) == []


def test_on_drop_can_keep_an_entry(tmp_path: Path) -> None:
    store = Store(tmp_path, clock=Clock())
    add(store, "layer", kind="run")
    assert store.prune(on_drop=lambda key, record: False) == []
    assert store.record("layer") is not None


def test_evict_respects_the_size_limit_and_keep(tmp_path: Path) -> None:
    store = Store(tmp_path, size_limit=12288, clock=Clock())
    add(store, "a", 8192)
    add(store, "b", 8192)
    assert store.evict(keep={"a"}) == ["b"]
    assert store.evict(keep=set()) == []


def test_a_step_is_built_by_one_holder_at_a_time(tmp_path: Path) -> None:
    first, second = Store(tmp_path), Store(tmp_path)
    events: list[str] = []
    waited = threading.Event()
    lock = first.build_lock("k")

    def contender() -> None:
        with second.building("k", on_wait=waited.set):
            events.append("second")

    thread = threading.Thread(target=contender)
    thread.start()
    assert waited.wait(5)  # it found the lock taken and said so
    thread.join(0.1)  # a lock that let it through would let it finish by now
    assert thread.is_alive() and events == []
    events.append("first done")
    lock.release()
    thread.join(5)
    assert events == ["first done", "second"]


def test_stats_count_entries_bytes_and_hits(tmp_path: Path) -> None:
    store = Store(tmp_path, clock=Clock())
    add(store, "e", 8192)
    add(store, "r", kind="run")
    store.touch("r")
    store.touch("r")
    stats = store.stats()
    assert stats["entries"] == 2 and stats["hits"] == 2 and stats["blob_bytes"] == 8192
    assert stats["kinds"]["export"] == {"entries": 1, "bytes": 8192, "hits": 0, "remote_hits": 0}
    assert stats["kinds"]["run"]["hits"] == 2
