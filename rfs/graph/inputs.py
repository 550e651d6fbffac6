"""Gather the facts a build's keys depend on: package file digests, tool versions, time.

Package files are hashed by content and normalised mode (`rfs.host.hashing.digest_input`); a file's
digest is remembered with its size, mtime, inode and ctime (a chmod changes the ctime) so an
unchanged file is not read again on the next build. What a step then uses is the build's own
snapshot of these files, checked against these digests (`rfs.run.snapshot`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rfs.host.hashing import digest_input
from rfs.script.model import BuildScript
from rfs.script.package import resolve_reference

# The store's table of remembered digests; renamed whenever the digest's format changes, so a
# digest of the old format is never taken for one of the new.
DIGEST_MEMO = "input-digests-2"


def package_refs(script: BuildScript) -> list[str]:
    """Every package file or directory the script references."""
    refs = [c.script_path for c in script.commands if c.script_path]
    refs += [o.source for o in script.overlays if o.source]
    refs += [c.source for c in script.copies if c.source]
    refs += [host for host, _ in script.container.volumes]
    if script.container.archive:
        refs.append(script.container.archive)
    if script.container.dockerfile:
        refs.append(script.container.dockerfile)
    return sorted(set(refs))


def command_refs(script: BuildScript, index: int) -> list[str]:
    """The package files command `index` sees: its script, the volumes, mounted overlays, and
    for the first command the copies."""
    cmd = script.commands[index]
    refs = [cmd.script_path] if cmd.script_path else []
    refs += [host for host, _ in script.container.volumes]
    refs += [o.source for o in script.overlays if o.mounted and o.source]
    if index == 0:  # the copies are placed into the first command's container
        refs += [c.source for c in script.copies if c.source]
    return sorted(set(refs))


def overlay_refs(script: BuildScript) -> list[str]:
    """The package files the assembly lays into the image."""
    return sorted({o.source for o in script.overlays if o.source})


def _stat_id(path: Path) -> list[int] | None:
    st = path.stat()
    if path.is_dir():
        return None  # a tree's mtime does not cover its files' content: always rehash
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def digest_refs(
    root: Path | None, refs: Iterable[str], memo: dict[str, Any] | None = None
) -> dict[str, str]:
    """Digest each referenced package path; `memo` (path -> [stat id, digest]) is updated."""
    digests: dict[str, str] = {}
    if root is None:
        return digests
    memo = memo if memo is not None else {}
    for ref in refs:
        path = resolve_reference(root, ref)
        ident = _stat_id(path)
        remembered = memo.get(str(path))
        if ident is not None and remembered and remembered[0] == ident:
            digests[ref] = remembered[1]
            continue
        digest = digest_input(path)
        digests[ref] = digest
        if ident is not None:
            memo[str(path)] = [ident, digest]
    return digests


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible-builds.org), else 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(raw) if raw.isdigit() else 0
