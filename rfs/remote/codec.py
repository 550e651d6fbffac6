"""How artifacts travel: zstd-compressed objects and sparse images (layers: rfs.remote.layers).

Every object is addressed by the sha256 of its (compressed) bytes, as the Bazel HTTP cache's
`cas/` and OCI registries both require, and carries the blake3 of the same bytes, which is
checked after every download before anything is decompressed or used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import blake3

from rfs.errors import RemoteCacheError
from rfs.host.sparse import data_extents

CHUNK = 1 << 20
ZSTD_LEVEL = 3  # fast to compress, and tarballs still shrink 2-4x
SPARSE_MAGIC = b"rfs-sparse-1\n"
# Tarball members up to this size travel inside the record (manifests, configs), saving a
# round trip per member.
INLINE_MAX = 16 * 1024
MAX_SPARSE_HEADER = 64 << 20  # extents of a fragmented 1 TiB image fit
#: Object names (sha256) and hashes: exactly this, nothing a path could be made of.
HEX64 = re.compile(r"[0-9a-f]{64}")
#: No object is larger (an image of 1 TiB, compressed, is far below).
MAX_OBJECT_BYTES = 1 << 40


class BadObject(RemoteCacheError):
    """An object is missing on the server or does not match its hashes: a miss, not an outage."""


@dataclass(frozen=True)
class ObjectRef:
    """A content-addressed object on a remote cache."""

    sha256: str
    blake3: str
    size: int

    def to_json(self) -> dict[str, Any]:
        """The object as stored in a remote record."""
        return {"sha256": self.sha256, "blake3": self.blake3, "size": self.size}

    @classmethod
    def from_json(cls, data: Any) -> ObjectRef:
        """Read an object reference from a remote record; raise BadObject if malformed.

        The names are exactly 64 lowercase hex digits: the sha256 becomes part of a URL and
        of nothing else, and no text a server sends can climb out of a directory or a path.
        """
        if not isinstance(data, dict) or set(data) != {"sha256", "blake3", "size"}:
            raise BadObject("malformed object reference in a remote record")
        sha, b3, size = data["sha256"], data["blake3"], data["size"]
        if not (
            isinstance(sha, str)
            and HEX64.fullmatch(sha)
            and isinstance(b3, str)
            and HEX64.fullmatch(b3)
            and isinstance(size, int)
            and not isinstance(size, bool)
            and 0 <= size <= MAX_OBJECT_BYTES
        ):
            raise BadObject("malformed object reference in a remote record")
        return cls(sha, b3, size)


class _HashingWriter:
    """Writes to a file, hashing (sha256 and blake3) and counting the bytes."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3.blake3()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.file.write(data)
        self.sha256.update(data)
        self.blake3.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def ref(self) -> ObjectRef:
        return ObjectRef(self.sha256.hexdigest(), self.blake3.hexdigest(), self.size)


class RawDigest:
    """A sink that only hashes and counts what passes through it (the uncompressed bytes)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hash = blake3.blake3()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError):
            self.inner.flush()


@contextlib.contextmanager
def packing(tmp_dir: Path) -> Iterator[tuple[Any, Callable[[], tuple[Path, ObjectRef]]]]:
    """Compress what is written to the yielded sink into an object file in `tmp_dir`.

    Yields (sink, finish); `finish()` closes the stream and returns (path, ref). The file is
    deleted when the block exits: upload it inside the block.
    """
    import zstandard

    fd, name = tempfile.mkstemp(prefix="object-", suffix=".zst", dir=tmp_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            out = _HashingWriter(file)
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
            writer = cctx.stream_writer(cast(IO[bytes], out), closefd=False)
            done: list[ObjectRef] = []

            def finish() -> tuple[Path, ObjectRef]:
                if not done:
                    writer.close()  # type: ignore[no-untyped-call]
                    file.flush()
                    done.append(out.ref())
                return path, done[0]

            yield writer, finish
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def verify_object(path: Path, ref: ObjectRef) -> None:
    """Check a downloaded object against its size and both hashes; raise BadObject if not."""
    size = path.stat().st_size
    if size != ref.size:
        raise BadObject(
            f"object {ref.sha256[:12]}… is {size} bytes, expected {ref.size} "
            "(truncated or replaced on the server)"
        )
    sha, b3 = hashlib.sha256(), blake3.blake3()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            b3.update(chunk)
    if b3.hexdigest() != ref.blake3 or sha.hexdigest() != ref.sha256:
        raise BadObject(
            f"object {ref.sha256[:12]}… does not match its blake3 hash "
            "(corrupted on the server or in transit)"
        )


def unpack(path: Path, dest: Any, limit: int) -> None:
    """Decompress a verified object file into `dest` (anything with `write`); raise BadObject
    if it holds more than `limit` bytes (a small object must not fill the disk)."""
    total = 0
    with open_unpacked(path) as reader:
        for chunk in iter(lambda: reader.read(CHUNK), b""):
            total += len(chunk)
            if total > limit:
                raise BadObject(f"object {path.name} decompresses to more than recorded")
            dest.write(chunk)


class _Unpacked(io.RawIOBase):
    """The decompressed content of an object file; zstd errors become BadObject (an object
    can match its hashes yet not be zstd: its writer was wrong, or hostile)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        super().__init__()
        self._errors = zstandard.ZstdError
        self._file = path.open("rb")
        self._name = path.name
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._file)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return bytes(self._reader.read(-1 if size is None else size))
        except self._errors as exc:
            raise BadObject(f"object {self._name} does not decompress: {exc}") from exc

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()  # type: ignore[no-untyped-call]
            self._file.close()
        super().close()


def open_unpacked(path: Path) -> BinaryIO:
    """A reader of the decompressed content of a verified object file."""
    return cast(BinaryIO, _Unpacked(path))


# -- sparse image files ---------------------------------------------------------------------


def encode_sparse(path: Path, sink: Any) -> None:
    """Write `path` to `sink` as a header of data extents followed by their bytes.

    A filesystem image is mostly holes, so only the data mke2fs wrote travels.
    """
    extents = data_extents(path)
    header = json.dumps({"size": path.stat().st_size, "extents": extents}).encode()
    sink.write(SPARSE_MAGIC + struct.pack(">Q", len(header)) + header)
    with path.open("rb") as f:
        for offset, length in extents:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise RemoteCacheError(f"{path} shrank while it was being uploaded")
                sink.write(chunk)
                left -= len(chunk)


def _read_exact(reader: Any, n: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < n:
        chunk = reader.read(min(CHUNK, n - buf.tell()))
        if not chunk:
            raise BadObject("a sparse image object ends early")
        buf.write(chunk)
    return buf.getvalue()


def decode_sparse(reader: Any, dest: Path, expected_size: int) -> None:
    """Recreate a sparse file of `expected_size` bytes at `dest` from what `encode_sparse`
    wrote; raise BadObject if the header does not describe such a file (extents in order,
    inside it), so a hostile header cannot make rfs write past it."""
    if _read_exact(reader, len(SPARSE_MAGIC)) != SPARSE_MAGIC:
        raise BadObject("not an rfs sparse image object")
    (length,) = struct.unpack(">Q", _read_exact(reader, 8))
    if length > MAX_SPARSE_HEADER:
        raise BadObject("a sparse image object has an oversized header")
    try:
        header = json.loads(_read_exact(reader, length))
        size = header["size"]
        extents = [(o, n) for o, n in header["extents"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadObject(f"malformed sparse image header: {type(exc).__name__}") from exc
    end = 0
    for offset, n in extents:
        if not (type(offset) is int and type(n) is int and offset >= end and n > 0):
            raise BadObject("malformed sparse image header: extents out of order")
        end = offset + n
    if size != expected_size or end > expected_size:
        raise BadObject("a sparse image object is not the size its record says")
    with dest.open("wb") as f:
        f.truncate(size)
        for offset, n in extents:
            f.seek(offset)
            left = n
            while left:
                chunk = reader.read(min(CHUNK, left))
                if not chunk:
                    raise BadObject("a sparse image object ends early")
                f.write(chunk)
                left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def copy_stream(src: IO[bytes], dest: Any) -> None:
    """Copy in chunks."""
    shutil.copyfileobj(src, dest, CHUNK)
