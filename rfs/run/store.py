"""The local cache: step records in a diskcache index, large artifacts as files beside it.

Layout of the cache directory:
    index/            diskcache (sqlite) index: one record per step key, plus the input
                      manifests of the last build of each script (to explain misses)
    blobs/<key>       artifacts (export tarballs; ext4 base images, sparse), written to tmp/
                      and renamed when complete
    tmp/              partial writes (`part-<pid>-…`): garbage once their process is gone
    locks/            per-key flock files (`rfs.host.locks`): a step is built by one process at a
                      time, and eviction skips entries a running build uses

diskcache's own culling is switched off: it would drop index rows without deleting the blob
files or the engine images they describe. rfs evicts whole entries itself, least recently
used first, when the blob bytes exceed the size limit, and `prune` removes the layer images
of the entries it drops through a callback (the store itself never talks to the engine).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from rfs.errors import EnvironmentProblem
from rfs.host.locks import FileLock, Locks

DEFAULT_SIZE_LIMIT = 20 * 1024**3
log = logging.getLogger("rfs.run.store")
# SQLite's result codes for a file that is not (or no longer) a sound database.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_STEP = "step/"
_LAST = "last/"
_CACHE_ID = "cache-id"
# Blob file identities (inode, size, mtime, ctime) at which this store last found, or wrote,
# the recorded digest.
_VERIFIED = "verified/"


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """True if `exc` says the database file is damaged (not merely busy or unwritable)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _identity(path: Path) -> list[int] | None:
    """(inode, size, mtime, ctime) of `path`, or None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def default_cache_dir() -> Path:
    """$RFS_CACHE_DIR, else $XDG_CACHE_HOME/rfs, else ~/.cache/rfs."""
    if os.environ.get("RFS_CACHE_DIR"):
        return Path(os.environ["RFS_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "rfs"
    return Path.home() / ".cache" / "rfs"


def _disk_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


@dataclass(frozen=True)
class Blob:
    """A completed artifact file and its verified identity."""

    path: Path
    size: int
    digest: str
    sparse: bool = False  # digested by data extents (rfs.host.hashing.digest_sparse_file)


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
    """Records and artifacts of built steps, keyed by step key.

    `clock` gives the times records are stamped with and pruned by (`time.time`; tests pass
    their own to order entries without sleeping).
    """

    def __init__(
        self,
        root: Path,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.size_limit = size_limit
        self._clock = clock
        try:
            for sub in ("blobs", "tmp"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            try:
                self._index = self._open_index()
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                self._index = self._replace_damaged_index(exc)
            self.locks = Locks(root / "locks")
        except sqlite3.OperationalError as exc:  # e.g. a full disk or a read-only directory
            raise EnvironmentProblem(
                f"cannot use the cache index in {root}: {exc}",
                hint="pass --cache-dir or set RFS_CACHE_DIR",
            ) from exc
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot use cache directory {root}: {exc.strerror}",
                hint="pass --cache-dir or set RFS_CACHE_DIR",
            ) from exc

    @functools.cached_property
    def cache_id(self) -> str:
        """This cache directory's own name, chosen at random once: its layer images are tagged
        `rfs/layer/<cache id>:<key>`, so caches sharing one engine never share, move or remove
        each other's tags (clearing one leaves the others' layers alone)."""
        new = os.urandom(6).hex()  # (secrets would import hmac and hashlib: 5 ms)
        self._index.add("meta/" + _CACHE_ID, {"id": new})  # only if none is there yet
        found = self.meta(_CACHE_ID).get("id")
        if isinstance(found, str) and re.fullmatch(r"[0-9a-f]{12}", found):
            return found
        self.set_meta(_CACHE_ID, {"id": new})  # a damaged value: start a new name
        return new

    def _open_index(self) -> Any:
        import diskcache  # imported here so commands that never touch the cache stay fast

        index = diskcache.Cache(
            str(self.root / "index"), eviction_policy="none", size_limit=2**62, statistics=False
        )
        index.get("meta/probe")  # a damaged database may open, and fail on the first read
        return index

    def _replace_damaged_index(self, exc: sqlite3.DatabaseError) -> Any:
        """Delete a damaged index and start an empty one: every step is a miss and is built
        again, which is slower but right. The blobs go too: without their records' digests
        they could not be verified."""
        log.warning("the cache index in %s is damaged (%s); starting it afresh", self.root, exc)
        shutil.rmtree(self.root / "index")
        for blob in (self.root / "blobs").iterdir():
            with contextlib.suppress(OSError):
                blob.unlink()
        shutil.rmtree(self.root / "side", ignore_errors=True)
        return self._open_index()

    def close(self) -> None:
        """Release the index's database handles and this process's use locks."""
        self.locks.release_all()
        self._index.close()

    def hold(self, keys: set[str]) -> None:
        """Protect `keys` from eviction by any process until `close` (call before planning)."""
        self.locks.hold(keys)

    def building(
        self,
        key: str,
        on_wait: Callable[[], None] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the build lock of `key`: one process builds a step, the others wait for it."""
        return self.locks.building(key, on_wait)

    def build_lock(self, key: str, on_wait: Callable[[], None] | None = None) -> FileLock:
        """Take the build lock of `key` (held until `release()`): see `building`."""
        return self.locks.build_lock(key, on_wait)

    # records -----------------------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of step `key`, or None (also for a record too damaged to read)."""
        try:
            value = self._index.get(_STEP + key)
        except sqlite3.OperationalError:
            raise  # the database is busy or unwritable: not the record's fault
        except Exception as exc:  # unpickling a damaged row can raise almost anything
            log.warning(
                "the cache record of %s is damaged (%s); treating it as missing", key[:12], exc
            )
            return None
        return value if isinstance(value, dict) else None

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        """Record a completed step; call only after its artifact is complete."""
        now = self._clock()
        record = {**record, "created": record.get("created", now), "last_used": now}
        self._index.set(_STEP + key, record)

    def touch(self, key: str) -> None:
        """Mark `key` as used now (for least-recently-used eviction)."""
        with self._index.transact():
            record = self.record(key)
            if record is not None:
                record["last_used"] = self._clock()
                record["hits"] = int(record.get("hits", 0)) + 1
                self._index.set(_STEP + key, record)

    def drop(self, key: str) -> None:
        """Forget step `key` and delete its blob (and the undo files kept beside it)."""
        self._index.delete(_STEP + key)
        self._index.delete(_VERIFIED + key)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "blobs" / key).unlink()
        shutil.rmtree(self.side_dir(key), ignore_errors=True)

    def side_dir(self, key: str) -> Path:
        """The directory of the files kept with the blob of `key` (an ext4 base image: undo
        files of the images patched from it, the export's parsed headers): dropped with it."""
        return self.root / "side" / key

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every step record, as (key, record)."""
        for name in list(self._index.iterkeys()):
            if isinstance(name, str) and name.startswith(_STEP):
                record = self.record(name[len(_STEP) :])
                if record is not None:
                    yield name[len(_STEP) :], record

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
        return Blob(path, size, str(record["blob_digest"]), bool(record.get("blob_sparse")))

    def verify_blob(self, blob: Blob, key: str | None = None) -> bool:
        """Whether `blob` still has its recorded digest.

        With `key`, a file this store already hashed (or wrote) is not read again while its
        inode, size, mtime and ctime are those it had then: any write to it, or a file put in
        its place, changes one of them (ctime cannot be set back), so a warm build costs what
        changed, not what the cache weighs. What this cannot see is a disk that changes a
        file's bytes by itself; `rfs cache verify` rehashes everything.
        """
        from rfs.host.hashing import digest_file, digest_sparse_file

        ident = _identity(blob.path)
        if ident is None:
            return False
        if key is not None:
            memo = self._index.get(_VERIFIED + key)
            if memo == {"id": ident, "digest": blob.digest}:
                return True
        try:
            digest = digest_sparse_file(blob.path) if blob.sparse else digest_file(blob.path)
        except OSError:
            return False
        if digest != blob.digest:
            return False
        if key is not None and _identity(blob.path) == ident:  # not rewritten while hashed
            self._index.set(_VERIFIED + key, {"id": ident, "digest": digest})
        return True

    def remember_verified(self, key: str, digest: str) -> None:
        """Note that the blob of `key` was just written with `digest` (hashed on the way in),
        so `verify_blob` need not read it again until the file changes."""
        ident = _identity(self.root / "blobs" / key)
        if ident is not None:
            self._index.set(_VERIFIED + key, {"id": ident, "digest": digest})

    def _part(self, key: str) -> Path:
        # The pid lets a later build remove it if this process is killed (remove_parts).
        return self.root / "tmp" / f"part-{os.getpid()}-{key}"

    def part_path(self, name: str) -> Path:
        """A path for a partial write named `name` (a later build removes it if this process
        is killed): the caller moves it into place (`adopt`) or deletes it."""
        return self._part(name)

    def adopt(self, key: str, path: Path, digest: str) -> None:
        """Make `path` (a `part_path` written with the content hash `digest`) the blob of
        `key`; record the step after, with `blob_size`/`blob_digest`."""
        os.replace(path, self.root / "blobs" / key)
        self.remember_verified(key, digest)

    def remove_parts(self) -> None:
        """Delete the partial writes of rfs processes that are gone (a SIGKILL allows no
        clean-up); a tool's own temp file beside one starts with a dot."""
        from rfs.host.orphans import remove_orphans

        for prefix in ("part-", ".part-"):
            remove_orphans(self.root / "tmp", prefix)

    @contextlib.contextmanager
    def blob_file(self, key: str) -> Iterator[Path]:
        """A path for a tool to write the artifact of `key` to; it becomes the blob only if
        the block completes (record it after, with `blob_size`/`blob_digest`)."""
        tmp = self._part(key)
        try:
            yield tmp
            os.replace(tmp, self.root / "blobs" / key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @contextlib.contextmanager
    def write_blob(self, key: str) -> Iterator[BlobWriter]:
        """Write an artifact for `key`; it appears only if the block completes.

        The caller records the step (with `blob_size`/`blob_digest` from the writer) after the
        block; a failure or interruption leaves no file behind.
        """
        tmp = self._part(key)
        try:
            writer = BlobWriter(tmp)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot write to the cache in {self.root}: {exc.strerror or exc}"
            ) from exc
        try:
            yield writer
            writer.close()
            os.replace(tmp, self.root / "blobs" / key)
            self.remember_verified(key, writer.digest)
        except BaseException as exc:
            with contextlib.suppress(OSError, ValueError):  # ValueError: closed already
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if isinstance(exc, OSError):  # a full disk shows here (fsync), not only in write
                raise EnvironmentProblem(
                    f"cannot write to the cache in {self.root}: {exc.strerror or exc}"
                ) from exc
            raise

    def blob_bytes(self) -> int:
        """Total bytes the artifacts occupy on disk (a sparse image counts what it allocates)."""
        total = 0
        for path in (self.root / "blobs").iterdir():
            with contextlib.suppress(FileNotFoundError):  # another process may evict it now
                total += _disk_bytes(path)
        return total

    def evict(self, keep: set[str]) -> list[str]:
        """Drop least recently used entries with blobs until under the size limit.

        Entries in use by any running build (its use locks) are skipped, as are `keep`.
        """
        if self.blob_bytes() <= self.size_limit:
            return []
        dropped = self.prune(max_size=self.size_limit, blobs_only=True, keep=keep)
        return [key for key, _ in dropped]

    def prune(
        self,
        *,
        max_size: int | None = None,
        older_than: float | None = None,
        blobs_only: bool = False,
        keep: set[str] | frozenset[str] = frozenset(),
        on_drop: Callable[[str, dict[str, Any]], bool] | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Drop entries, least recently used first, and return them as (key, record).

        An entry goes if it was last used more than `older_than` seconds ago, or while the blob
        bytes exceed `max_size`; with neither, every entry goes (`rfs cache clear`).
        `on_drop(key, record)` runs first (to remove a layer image from the engine) and keeps
        the entry by returning False. Entries used by a running build are never dropped.
        """
        now = self._clock()
        total = self.blob_bytes()
        candidates = sorted(
            (
                (float(r.get("last_used", 0.0)), k, r)
                for k, r in self.records()
                if k not in keep and (not blobs_only or "blob_size" in r)
            ),
            key=lambda item: (item[0], item[1]),
        )
        everything = max_size is None and older_than is None
        dropped: list[tuple[str, dict[str, Any]]] = []
        for last_used, key, record in candidates:
            old = older_than is not None and now - last_used > older_than
            big = max_size is not None and total > max_size
            if not (everything or old or big):
                continue
            with self.locks.evicting(key) as free:
                if not free:
                    continue
                if on_drop is not None and not on_drop(key, record):
                    continue
                blob = self.blob(key)
                size = _disk_bytes(blob.path) if blob is not None else 0
                self.drop(key)
                total -= size
                dropped.append((key, record))
        self.locks.sweep({key for key, _ in self.records()})
        return dropped

    def stats(self) -> dict[str, Any]:
        """Entries, bytes and hits by kind, for `rfs cache info`."""
        kinds: dict[str, dict[str, int]] = {}
        for key, record in self.records():
            kind = str(record.get("kind", "unknown"))
            row = kinds.setdefault(kind, {"entries": 0, "bytes": 0, "hits": 0, "remote_hits": 0})
            row["entries"] += 1
            row["hits"] += int(record.get("hits", 0))
            row["remote_hits"] += 1 if record.get("fetched_from") else 0
            blob = self.blob(key)
            if blob is not None:
                with contextlib.suppress(FileNotFoundError):
                    row["bytes"] += _disk_bytes(blob.path)
            row["bytes"] += int(record.get("layer_bytes", 0))
        return {
            "directory": str(self.root),
            "entries": sum(r["entries"] for r in kinds.values()),
            "bytes": sum(r["bytes"] for r in kinds.values()),
            "hits": sum(r["hits"] for r in kinds.values()),
            "blob_bytes": self.blob_bytes(),
            "size_limit": self.size_limit,
            "kinds": kinds,
        }
