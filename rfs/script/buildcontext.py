"""The build context of a `container.dockerfile` base: which package files the engine sees,
and the tar rfs sends it.

The context is `container.context` (a package directory) less what its `.dockerignore`
excludes, with the docker SDK's matcher (`docker.utils.build.PatternMatcher`, moby's rules):
the Dockerfile and `.dockerignore` are always sent, as the docker CLI sends them (the engine
drops them from what COPY sees when `.dockerignore` names them); the build script never is
(it is rfs's, and editing it must not rebuild the base). Files are keyed as other
package files (content and the owner's execute bit, `rfs.host.hashing.digest_input`),
directories by name, symlinks by target (the engine copies the link, never follows it). The
tar holds exactly those entries with normalised metadata (owner 0, mode 0755/0644, mtime 0),
and every file in it is the build's checked copy (`snapshot`), so what is keyed is what the
engine builds from.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rfs.errors import RfsError
from rfs.script.model import BuildScript
from rfs.script.package import resolve_reference

DOCKERIGNORE = ".dockerignore"


@dataclass(frozen=True)
class ContextEntry:
    """One path of the build context."""

    name: str  # relative to the context directory, "/"-separated
    kind: str  # "file", "dir" or "link"
    ref: str  # the package reference ("/ctx/name")
    target: str = ""  # a link's target


def _patterns(directory: Path) -> list[str]:
    try:
        text = (directory / DOCKERIGNORE).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    # As the docker CLI reads it: one pattern a line, blank lines and # comments skipped.
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def dockerfile_name(script: BuildScript) -> str:
    """The Dockerfile's path inside the context (the schema keeps it inside)."""
    c = script.container
    assert c.dockerfile is not None
    prefix = c.context.rstrip("/") + "/"
    return c.dockerfile[len(prefix) :] if c.dockerfile.startswith(prefix) else c.dockerfile


def context_entries(script: BuildScript) -> list[ContextEntry]:
    """The entries of the build context, sorted by name, after `.dockerignore`."""
    from docker.utils.build import PatternMatcher

    c = script.container
    assert c.dockerfile is not None and script.package_root is not None
    directory = resolve_reference(script.package_root, c.context)
    matcher = PatternMatcher([*_patterns(directory), f"!{dockerfile_name(script)}"])
    prefix = c.context.rstrip("/") + "/"
    # The build script is rfs's, not the image's: editing it must not rebuild the base.
    script_path = script.package_root / script.script_file.name
    entries = []
    for name in sorted(matcher.walk(str(directory))):
        path = directory / name
        if path == script_path:
            continue
        posix = Path(name).as_posix()
        if os.path.islink(path):
            entries.append(ContextEntry(posix, "link", prefix + posix, os.readlink(path)))
        elif path.is_dir():
            entries.append(ContextEntry(posix, "dir", prefix + posix))
        elif path.is_file():
            entries.append(ContextEntry(posix, "file", prefix + posix))
        # Sockets, FIFOs, devices: the docker SDK leaves them out too.
    return entries


def context_refs(entries: list[ContextEntry]) -> list[str]:
    """The package references of the context's files, to digest like other package files."""
    return [e.ref for e in entries if e.kind == "file"]


def context_digests(entries: list[ContextEntry], digests: Mapping[str, str]) -> dict[str, str]:
    """Name -> digest of each context entry, as the key holds it."""
    out = {}
    for entry in entries:
        if entry.kind == "file":
            out[entry.name] = digests[entry.ref]
        elif entry.kind == "dir":
            out[entry.name] = "dir"
        else:
            out[entry.name] = f"link:{entry.target}"
    return out


def write_context(
    script: BuildScript,
    entries: list[ContextEntry],
    copy_of: Callable[[str], Path],
    out: BinaryIO,
) -> None:
    """Write the context tar of `entries` to `out`; `copy_of(ref)` gives a file's checked copy.

    A symlink whose target changed since planning stops the build, as an edited file does.
    """
    assert script.package_root is not None
    directory = resolve_reference(script.package_root, script.container.context)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif entry.kind == "link":
                now = os.readlink(directory / entry.name)
                if now != entry.target:
                    raise RfsError(
                        f"package path {entry.ref} changed after rfs planned this build "
                        "(a symlink's target); run the build again to use the new one"
                    )
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                info.mode = 0o777
                tar.addfile(info)
            else:
                copy = copy_of(entry.ref)
                info.mode = 0o755 if os.stat(copy).st_mode & 0o100 else 0o644
                info.size = copy.stat().st_size
                with copy.open("rb") as f:
                    tar.addfile(info, f)
