"""Reading a tar member's bytes in a test."""

from __future__ import annotations

import tarfile


def member_bytes(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """The content of a regular file (or hard link) member; `extractfile` gives the other
    kinds None, and a test asking for one is wrong."""
    f = tar.extractfile(member)
    assert f is not None, f"{member} is not a regular file in the archive"
    with f:
        return f.read()
