"""Load a package: a single build script, or a directory holding build.toml / build.yaml.

This is the only module of the schema layer that reads files. Package references
(`script_path`, overlay `source`, volume host paths) are rooted at the package directory;
anything that resolves outside it is refused, since a build script must never read the host.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rfs.errors import Problem, ScriptError, UsageError
from rfs.model import BuildScript
from rfs.schema import collect_script

SCRIPT_NAMES = ("build.toml", "build.yaml", "build.yml")


@dataclass(frozen=True)
class Loaded:
    """A loaded build script and the warnings found while reading it."""

    script: BuildScript
    warnings: tuple[Problem, ...]


def _parse_document(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScriptError([Problem("", f"is not UTF-8 text (byte {exc.start})", str(path))]
                          ) from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only YAML users pay for the import

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ScriptError([Problem("", f"invalid YAML: {where}{problem}", str(path))]
                              ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScriptError([Problem("", f"invalid TOML: {exc}", str(path))]) from exc


def find_script(package: Path) -> tuple[Path, Path | None]:
    """Return (script file, package root or None for a single-file script)."""
    if package.is_dir():
        for name in SCRIPT_NAMES:
            candidate = package / name
            if candidate.is_file():
                return candidate, package.resolve()
        raise UsageError(f"{package} holds no build script ({', '.join(SCRIPT_NAMES)})")
    if package.is_file():
        return package, None
    raise UsageError(f"{package}: no such file or directory")


def resolve_reference(root: Path, ref: str) -> Path:
    """Map a package-rooted reference ("/scripts/a.sh") to a host path inside `root`.

    Raises ValueError when the reference (or a symlink on its way) leads out of the package.
    """
    candidate = (root / ref.lstrip("/")).resolve()
    if candidate != root and root not in candidate.parents:
        raise ValueError(f"{ref} leads outside the package")
    return candidate


def _check_references(script: BuildScript, file: str) -> list[Problem]:
    refs: list[tuple[str, str, str]] = []  # (field path, reference, "file" | "dir" | "any")
    for i, cmd in enumerate(script.commands):
        if cmd.script_path:
            refs.append((f"commands[{i}].script_path", cmd.script_path, "file"))
    for i, ov in enumerate(script.overlays):
        if ov.source:
            refs.append((f"overlays[{i}].source", ov.source, "dir" if ov.is_directory else "file"))
    for vol, _ in script.container.volumes:
        refs.append((f"container.volumes.{vol}", vol, "any"))
    problems = []
    root = script.package_root
    for field_path, ref, kind in refs:
        if root is None:
            problems.append(Problem(field_path, f"{ref}: a single-file build script cannot "
                                    "reference package files; make a directory with build.toml",
                                    file))
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
            problems.append(Problem(field_path, f"{ref} is not a directory (is_directory = true)",
                                    file))
    return problems


def load(package: Path) -> Loaded:
    """Load and validate the build script of `package`; raise ScriptError with every problem."""
    script_file, root = find_script(package)
    doc = _parse_document(script_file)
    script, problems = collect_script(doc, file=str(script_file), package_root=root)
    problems += _check_references(script, str(script_file))
    if any(p.severity == "error" for p in problems):
        raise ScriptError(problems)
    return Loaded(script, tuple(problems))
