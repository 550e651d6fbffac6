"""The one interface every remote cache backend implements (settings: rfs.remote.config).

A backend stores two things, as Bazel's remote cache does:
    records   small JSON documents, one per step key (and scope): the "action cache", `ac/`;
    objects   content-addressed bytes, by sha256: the "content store", `cas/`.
Records name the objects they need, so a reader fetches a record first and then only the
objects the plan needs.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rfs.host.hashing import digest_bytes

if TYPE_CHECKING:  # the codec (tarfile, zstandard) is not needed to read settings
    from rfs.remote.codec import ObjectRef

#: Records larger than this are refused: a record is a few KiB of JSON.
MAX_RECORD_BYTES = 16 * 1024 * 1024


def record_names(key: str, scope: str | None) -> list[str]:
    """The record names to read for `key`: the scope's first, then the default scope's.

    Scoped names are hashes too (64 hex digits), so they fit every server's key format.
    """
    if not scope:
        return [key]
    return [scoped_name(key, scope), key]


def scoped_name(key: str, scope: str | None) -> str:
    """The record name `key` is written under in `scope`."""
    if not scope:
        return key
    return digest_bytes(b"rfs-scope\0" + scope.encode() + b"\0" + key.encode())


def is_loopback(host: str) -> bool:
    """Whether `host` (without port) is this machine, where plain HTTP is acceptable."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Backend(Protocol):
    """A remote cache server. Every method raises only RemoteCacheError (or BadObject)."""

    url: str

    def get_record(self, name: str) -> bytes | None:
        """The record `name`, or None if the server has none."""
        ...

    def put_record(self, name: str, data: bytes, objects: list[ObjectRef]) -> None:
        """Store record `name`, which refers to `objects` (already uploaded)."""
        ...

    def has_object(self, ref: ObjectRef) -> bool:
        """Whether the server holds the object."""
        ...

    def get_object(self, ref: ObjectRef, dest: Path) -> None:
        """Download the object into the file `dest` (not verified here: the caller does)."""
        ...

    def put_object(self, ref: ObjectRef, path: Path) -> None:
        """Upload the object file at `path`."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
