"""How artifacts travel: zstd-compressed objects, sparse images, image tarballs split by member.

Every object is addressed by the sha256 of its (compressed) bytes, as the Bazel HTTP cache's
`cas/` and OCI registries both require, and carries the blake3 of the same bytes, which is
checked after every download before anything is decompressed or used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import blake3

from rfs.errors import RemoteCacheError
from rfs.sparse import data_extents

CHUNK = 1 << 20
ZSTD_LEVEL = 3  # fast to compress, and tarballs still shrink 2-4x
SPARSE_MAGIC = b"rfs-sparse-1\n"
# Tarball members up to this size travel inside the record (manifests, configs), saving a
# round trip per member.
INLINE_MAX = 16 * 1024


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
        """Read an object reference from a remote record; raise BadObject if malformed."""
        try:
            ref = cls(str(data["sha256"]), str(data["blake3"]), int(data["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadObject(f"malformed object reference in a remote record: {exc}") from exc
        if len(ref.sha256) != 64 or len(ref.blake3) != 64 or ref.size < 0:
            raise BadObject("malformed object reference in a remote record")
        return ref


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
        raise BadObject(f"object {ref.sha256[:12]}… is {size} bytes, expected {ref.size} "
                        "(truncated or replaced on the server)")
    sha, b3 = hashlib.sha256(), blake3.blake3()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
            b3.update(chunk)
    if b3.hexdigest() != ref.blake3 or sha.hexdigest() != ref.sha256:
        raise BadObject(f"object {ref.sha256[:12]}… does not match its blake3 hash "
                        "(corrupted on the server or in transit)")


def unpack(path: Path, dest: Any) -> None:
    """Decompress a verified object file into `dest` (anything with `write`)."""
    import zstandard

    try:
        with path.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                dest.write(chunk)
    except zstandard.ZstdError as exc:
        raise BadObject(f"object {path.name} does not decompress: {exc}") from exc


def open_unpacked(path: Path) -> BinaryIO:
    """A reader of the decompressed content of a verified object file."""
    import zstandard

    reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(path.open("rb"),
                                                                  closefd=True)
    return reader


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


def decode_sparse(reader: Any, dest: Path) -> None:
    """Recreate a sparse file at `dest` from what `encode_sparse` wrote."""
    if _read_exact(reader, len(SPARSE_MAGIC)) != SPARSE_MAGIC:
        raise BadObject("not an rfs sparse image object")
    (length,) = struct.unpack(">Q", _read_exact(reader, 8))
    try:
        header = json.loads(_read_exact(reader, length))
        size = int(header["size"])
        extents = [(int(o), int(n)) for o, n in header["extents"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadObject(f"malformed sparse image header: {exc}") from exc
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


# -- image tarballs (docker save), split into members -----------------------------------------


def split_tarball(path: Path, put: Callable[[IO[bytes], int], ObjectRef]) -> list[dict[str, Any]]:
    """Describe the image tarball at `path` member by member; large files go through `put`.

    `docker save` repeats every parent layer in every layer's tarball; stored member by
    member, a layer shared by many steps (the base image's, above all) is uploaded once.
    """
    members: list[dict[str, Any]] = []
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            entry: dict[str, Any] = {"name": m.name, "mode": m.mode, "mtime": int(m.mtime)}
            if m.isfile():
                entry["type"] = "file"
                data = tar.extractfile(m)
                assert data is not None
                if m.size <= INLINE_MAX:
                    entry["data"] = base64.b64encode(data.read()).decode()
                else:
                    entry["object"] = put(data, m.size).to_json()
                    entry["size"] = m.size
            elif m.isdir():
                entry["type"] = "dir"
            elif m.issym() or m.islnk():
                entry["type"] = "symlink" if m.issym() else "link"
                entry["target"] = m.linkname
            else:
                raise RemoteCacheError(f"unexpected member {m.name!r} in an image tarball")
            members.append(entry)
    return members


def join_tarball(members: list[dict[str, Any]], objects: dict[str, Path], dest: IO[bytes]) -> None:
    """Write the image tarball described by `members` to `dest`.

    `objects` maps each member object's sha256 to its downloaded, verified file.
    """
    with tarfile.open(fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in members:
            info = tarfile.TarInfo(str(entry["name"]))
            info.mode = int(entry["mode"])
            info.mtime = int(entry["mtime"])
            kind = entry["type"]
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind in ("symlink", "link"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = str(entry["target"])
                tar.addfile(info)
            elif "data" in entry:
                data = base64.b64decode(entry["data"])
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                ref = ObjectRef.from_json(entry["object"])
                info.size = int(entry["size"])
                with open_unpacked(objects[ref.sha256]) as reader:
                    try:
                        tar.addfile(info, reader)
                    except OSError as exc:  # tarfile: "unexpected end of data"
                        raise BadObject(f"member {info.name} is shorter than recorded") from exc
                    if reader.read(1):
                        raise BadObject(f"member {info.name} is longer than recorded")


def copy_stream(src: IO[bytes], dest: Any) -> None:
    """Copy in chunks."""
    shutil.copyfileobj(src, dest, CHUNK)


# -- records ------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A store record in JSON terms: bytes become {"$b64": ...}."""
    if isinstance(value, bytes):
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def from_jsonable(value: Any) -> Any:
    """The inverse of `jsonable`."""
    if isinstance(value, dict):
        if set(value) == {"$b64"}:
            return base64.b64decode(value["$b64"])
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value
