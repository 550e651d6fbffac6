"""The local cache: step records in a diskcache index, large artifacts as files beside it.

Layout of the cache directory:
    index/            diskcache (sqlite) index: one record per step key, plus the input
                      manifests of the last build of each script (to explain misses)
    blobs/<key>       artifacts (export tarballs), written to tmp/ and renamed when complete
    tmp/              partial writes; anything here is garbage from an interrupted build

diskcache's own culling is switched off: it would drop index rows without deleting the blob
files or the engine images they describe. rfs evicts whole entries itself, least recently
used first, when the blob bytes exceed the size limit.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from rfs.errors import EnvironmentProblem

DEFAULT_SIZE_LIMIT = 20 * 1024**3
_STEP = "step/"
_LAST = "last/"


def default_cache_dir() -> Path:
    """$RFS_CACHE_DIR, else $XDG_CACHE_HOME/rfs, else ~/.cache/rfs."""
    if os.environ.get("RFS_CACHE_DIR"):
        return Path(os.environ["RFS_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "rfs"
    return Path.home() / ".cache" / "rfs"


@dataclass(frozen=True)
class Blob:
    """A completed artifact file and its verified identity."""

    path: Path
    size: int
    digest: str


class BlobWriter:
    """A file-like sink that hashes what it is given; see `Store.write_blob`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("xb")
        self._hash = blake3.blake3()
        self.size = 0

    def write(self, data: bytes) -> int:
        """Append `data`, hashing it on the way."""
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def close(self) -> None:
        """Flush the data to disk before the file is renamed into place."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    @property
    def digest(self) -> str:
        """The blake3 digest of everything written so far."""
        return self._hash.hexdigest()


class Store:
    """Records and artifacts of built steps, keyed by step key."""

    def __init__(self, root: Path, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        import diskcache  # imported here so commands that never touch the cache stay fast

        self.root = root
        self.size_limit = size_limit
        try:
            for sub in ("blobs", "tmp"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            self._index = diskcache.Cache(
                str(root / "index"), eviction_policy="none", size_limit=2**62,
                statistics=False,
            )
        except OSError as exc:
            raise EnvironmentProblem(f"cannot use cache directory {root}: {exc.strerror}",
                                     hint="pass --cache-dir or set RFS_CACHE_DIR") from exc

    def close(self) -> None:
        """Release the index's database handles."""
        self._index.close()

    # records -----------------------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of step `key`, or None."""
        value = self._index.get(_STEP + key)
        return value if isinstance(value, dict) else None

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        """Record a completed step; call only after its artifact is complete."""
        now = time.time()
        record = {**record, "created": record.get("created", now), "last_used": now}
        self._index.set(_STEP + key, record)

    def touch(self, key: str) -> None:
        """Mark `key` as used now (for least-recently-used eviction)."""
        with self._index.transact():
            record = self.record(key)
            if record is not None:
                record["last_used"] = time.time()
                record["hits"] = int(record.get("hits", 0)) + 1
                self._index.set(_STEP + key, record)

    def drop(self, key: str) -> None:
        """Forget step `key` and delete its blob."""
        self._index.delete(_STEP + key)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "blobs" / key).unlink()

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every step record, as (key, record)."""
        for name in list(self._index.iterkeys()):
            if isinstance(name, str) and name.startswith(_STEP):
                record = self.record(name[len(_STEP):])
                if record is not None:
                    yield name[len(_STEP):], record

    def meta(self, name: str) -> dict[str, Any]:
        """A named bookkeeping table (e.g. remembered file digests)."""
        value = self._index.get("meta/" + name)
        return value if isinstance(value, dict) else {}

    def set_meta(self, name: str, value: dict[str, Any]) -> None:
        """Replace a named bookkeeping table."""
        self._index.set("meta/" + name, value)

    # manifests of the last build, for explanations ----------------------------------------

    def last_manifests(self, script_id: str) -> dict[str, Any]:
        """The step manifests of the last build of the script identified by `script_id`."""
        value = self._index.get(_LAST + script_id)
        return value if isinstance(value, dict) else {}

    def save_manifests(self, script_id: str, manifests: dict[str, Any]) -> None:
        """Remember the manifests of this build, to explain the next one's misses."""
        self._index.set(_LAST + script_id, manifests)

    # blobs -------------------------------------------------------------------------------

    def blob(self, key: str) -> Blob | None:
        """The artifact of `key` if its file exists with the recorded size (a cheap check)."""
        record = self.record(key)
        if record is None or "blob_size" not in record:
            return None
        path = self.root / "blobs" / key
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size != record["blob_size"]:
            return None
        return Blob(path, size, str(record["blob_digest"]))

    def verify_blob(self, blob: Blob) -> bool:
        """Rehash `blob` and compare with its recorded digest."""
        from rfs.hashing import digest_file

        return digest_file(blob.path) == blob.digest

    @contextlib.contextmanager
    def write_blob(self, key: str) -> Iterator[BlobWriter]:
        """Write an artifact for `key`; it appears only if the block completes.

        The caller records the step (with `blob_size`/`blob_digest` from the writer) after the
        block; a failure or interruption leaves no file behind.
        """
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.part"
        writer = BlobWriter(tmp)
        try:
            yield writer
            writer.close()
            os.replace(tmp, self.root / "blobs" / key)
        except BaseException:
            with contextlib.suppress(OSError):
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def blob_bytes(self) -> int:
        """Total bytes of artifacts on disk."""
        return sum(p.stat().st_size for p in (self.root / "blobs").iterdir() if p.is_file())

    def evict(self, keep: set[str]) -> list[str]:
        """Drop least recently used entries with blobs until under the size limit."""
        total = self.blob_bytes()
        if total <= self.size_limit:
            return []
        dropped = []
        candidates = sorted(
            ((r.get("last_used", 0.0), k, int(r.get("blob_size", 0)))
             for k, r in self.records() if "blob_size" in r and k not in keep),
        )
        for _, key, size in candidates:
            if total <= self.size_limit:
                break
            self.drop(key)
            total -= size
            dropped.append(key)
        return dropped
