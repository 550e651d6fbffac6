"""Load a package: a build script, a directory holding build.toml / build.yaml, or that
directory as a tar archive (plain or gzip-compressed; see `packing.py`).

This is the only module of the schema layer that reads files. Package references
(`script_path`, overlay `source`, volume host paths, `container.archive`) are rooted at the
package directory; anything that resolves outside it is refused, since a build script must never
read the host. A build script named directly (`rfs build pkg/build.toml`, any name, TOML or
YAML) is the package rooted at its own directory, as buildfs's `pack` reads it: the script sits
among the files it references.

An archive is unpacked into a private temporary directory that lives as long as the rfs process:
the build reads scripts and overlays from it and bind-mounts volumes out of it until the end.
It is removed when the process exits, and a later rfs removes those a killed one left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rfs.errors import Problem, ScriptError, UsageError
from rfs.host.orphans import remove_orphans, remove_tree
from rfs.script.document import parse_bytes
from rfs.script.model import BuildScript
from rfs.script.schema import SCRIPT_NAMES, collect_script

_UNPACK_PREFIX = "rfs-package-"
# archive path -> (its stat identity, unpacked root, temporary directory), for this process
_unpacked: dict[Path, tuple[tuple[int, int, int], Path, Path]] = {}


@dataclass(frozen=True)
class Loaded:
    """A loaded build script and the warnings found while reading it."""

    script: BuildScript
    warnings: tuple[Problem, ...]


def _parse_document(path: Path, label: str) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_bytes(raw, path.suffix, label)


def find_script(package: Path) -> tuple[Path, Path]:
    """Return (script file, package root): a directory's build script, or a script named
    directly with its own directory as the root."""
    if package.is_dir():
        for name in SCRIPT_NAMES:
            candidate = package / name
            if candidate.is_file():
                return candidate, package.resolve()
        raise UsageError(f"{package} holds no build script ({', '.join(SCRIPT_NAMES)})")
    if package.is_file():
        return package, package.resolve().parent
    raise UsageError(f"{package}: no such file or directory")


def resolve_reference(root: Path, ref: str) -> Path:
    """Map a package-rooted reference ("/scripts/a.sh") to a host path inside `root`.

    Raises ValueError when the reference (or a symlink on its way) leads out of the package.
    """
    candidate = (root / ref.lstrip("/")).resolve()
    if candidate != root and root not in candidate.parents:
        raise ValueError(f"{ref} leads outside the package")
    return candidate


def references(script: BuildScript) -> list[tuple[str, str, str]]:
    """Every package path the script uses: (field path, reference, "file" | "dir" | "any")."""
    refs: list[tuple[str, str, str]] = []
    if script.container.archive:
        refs.append(("container.archive", script.container.archive, "file"))
    if script.container.dockerfile:
        refs.append(("container.dockerfile", script.container.dockerfile, "file"))
        refs.append(("container.context", script.container.context, "dir"))
    for i, cmd in enumerate(script.commands):
        if cmd.script_path:
            refs.append((f"commands[{i}].script_path", cmd.script_path, "file"))
    for i, ov in enumerate(script.overlays):
        if ov.source:
            refs.append((f"overlays[{i}].source", ov.source, "dir" if ov.is_directory else "file"))
    for vol, _ in script.container.volumes:
        refs.append((f"container.volumes.{vol}", vol, "any"))
    for i, copy in enumerate(script.copies):
        if copy.source:
            refs.append((f"copy[{i}].source", copy.source, "any"))
    return refs


def _check_references(script: BuildScript, file: str) -> list[Problem]:
    refs = references(script)
    problems = []
    root = script.package_root
    for field_path, ref, kind in refs:
        if root is None:  # a script parsed from bytes alone: there are no package files
            problems.append(
                Problem(
                    field_path,
                    f"{ref}: this build script has no package directory to take package files from",
                    file,
                )
            )
            continue
        try:
            host = resolve_reference(root, ref)
        except ValueError as exc:
            problems.append(Problem(field_path, str(exc), file))
            continue
        if not host.exists():
            problems.append(Problem(field_path, f"{ref} not found in package {root}", file))
        elif kind == "file" and not host.is_file():
            problems.append(Problem(field_path, f"{ref} is not a regular file", file))
        elif kind == "dir" and not host.is_dir():
            hint = "" if field_path == "container.context" else " (is_directory = true)"
            problems.append(Problem(field_path, f"{ref} is not a directory{hint}", file))
        elif field_path.endswith(".script_path") and (why := _script_problem(host)):
            problems.append(Problem(field_path, f"{ref} {why}", file))
        elif kind != "file" and (socket := _socket_in(host)) is not None:
            # A host socket in a build container is a way out of it (the engine's socket gives
            # root on the host), and a package never needs one.
            where = ref if socket == host else f"{ref}/{socket.relative_to(host)}"
            problems.append(
                Problem(
                    field_path,
                    f"{where} is a socket; rfs never passes a socket into a build container",
                    file,
                )
            )
    problems += _dockerfile_problems(script, file)
    return problems


def _dockerfile_problems(script: BuildScript, file: str) -> list[Problem]:
    """The Dockerfile is sent to the engine inside its context, so it must lie in it."""
    c = script.container
    if c.dockerfile is None:
        return []
    inside = c.context == "/" or c.dockerfile.startswith(c.context.rstrip("/") + "/")
    if inside:
        return []
    return [
        Problem(
            "container.dockerfile",
            f"{c.dockerfile} is outside container.context {c.context}: the engine reads the "
            "Dockerfile from the context it is sent, so move it into the context",
            file,
        )
    ]


def _script_problem(path: Path) -> str | None:
    """Why a `script_path` file cannot be run, or None: it must be UTF-8 text, not blank."""
    try:
        body = path.read_bytes()
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not body.strip():
        return "is empty"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start})"
    return None


def _socket_in(path: Path) -> Path | None:
    """The first socket at or under `path` (symlinks not followed), or None."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            return path
    except OSError:
        return None
    if not path.is_dir():
        return None
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            child = Path(dirpath, name)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(child.lstat().st_mode):
                    return child
    return None


def collect(package: Path) -> tuple[BuildScript | None, list[Problem]]:
    """Read `package` (any form) as far as possible: the model, if any, and every problem.

    For `rfs check`, which reports everything at once; `load` is the strict form.
    """
    origin = None
    try:
        if not package.is_dir() and _is_archive(package):
            origin, package = package, unpacked(package)
    except ScriptError as exc:  # the archive itself is bad: nothing more to read
        return None, list(exc.problems)
    script_file, root = find_script(package)
    # Problems in an unpacked archive name the archive, not the temporary directory.
    label = str(script_file) if origin is None else f"{origin}:{script_file.name}"
    try:
        doc = _parse_document(script_file, label)
        script, problems = collect_script(doc, file=label, package_root=root)
    except ScriptError as exc:
        return None, list(exc.problems)
    if origin is not None:
        script = dataclasses.replace(script, script_file=script_file, origin=origin)
    problems += _check_references(script, label)
    return script, problems


def load(package: Path) -> Loaded:
    """Load and validate the build script of `package`; raise ScriptError with every problem."""
    script, problems = collect(package)
    if script is None or any(p.severity == "error" for p in problems):
        raise ScriptError(problems)
    return Loaded(script, tuple(problems))


def unpacked(archive: Path) -> Path:
    """The package root of `archive`, unpacked once per process (again if the file changed)."""
    key = archive.resolve()
    st = key.stat()
    ident = (st.st_size, st.st_mtime_ns, st.st_ino)
    known = _unpacked.get(key)
    if known is not None and known[0] == ident:
        return known[1]
    if known is not None:
        remove_tree(known[2])
        del _unpacked[key]
    _remove_orphans()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_UNPACK_PREFIX}{os.getpid()}-"))
    try:
        from rfs.script.archive import extract  # tarfile and gzip: only for archives

        root = extract(archive, tmp).resolve()
    except BaseException:
        remove_tree(tmp)
        raise
    if not _unpacked:
        atexit.register(cleanup)
    _unpacked[key] = (ident, root, tmp)
    return root


def cleanup() -> None:
    """Remove every package this process unpacked (also run at exit)."""
    while _unpacked:
        _, (_, _, tmp) = _unpacked.popitem()
        remove_tree(tmp)


def _remove_orphans() -> None:
    """Remove unpacked packages of rfs processes that died without cleaning up (SIGKILL)."""
    remove_orphans(Path(tempfile.gettempdir()), _UNPACK_PREFIX)


def _is_archive(package: Path) -> bool:
    from rfs.script.archive import detect

    return detect(package).is_archive
