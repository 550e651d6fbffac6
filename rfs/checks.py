"""What `rfs check` verifies about the machine before any container starts.

The build script and package files are checked by `schema.py` and `package.py`; this module
adds what depends on the host: the filesystem tool, the engine, the base image. Each finding is
a `Problem` located at the field it concerns (`container.image`, `filesystem.type`, …), so a
person sees every problem at once, next to the setting that causes it.
"""

from __future__ import annotations

from rfs.errors import Problem, RfsError, ScriptError
from rfs.model import BuildScript

# A person waits for `rfs check`: an engine that does not answer within this is reported.
ENGINE_TIMEOUT_S = 10.0


def environment_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """Every problem of the machine with building `script`, each at the field it concerns."""
    problems = mkfs_problems(script, file)
    problems += base_archive_problems(script, file)
    problems += engine_problems(script, file)
    return problems


def mkfs_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """The tool that makes the image type: present and recent enough."""
    from rfs.fs.assemble import tool_version

    try:
        tool_version(script.filesystem.type)
    except RfsError as exc:  # missing, too old, or failing to say its version
        hint = f" ({exc.hint})" if exc.hint else ""
        return [Problem("filesystem.type", f"{exc.message}{hint}", file)]
    return []


def base_archive_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """`container.archive` must be a readable tarball (references are checked on load)."""
    c = script.container
    if c.archive is None or script.package_root is None:
        return []
    from rfs.package import resolve_reference
    from rfs.packing import inspect_base_archive

    try:
        path = resolve_reference(script.package_root, c.archive)
    except ValueError:
        return []  # reported by the package check
    if not path.is_file():
        return []
    try:
        inspect_base_archive(path)
    except ScriptError as exc:
        return [Problem(p.path, p.message, file) for p in exc.problems]
    return []


def engine_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """The engine answers at its address, has the OCI runtime asked for, and the base image
    is local or pullable."""
    from rfs.engine import connect

    c = script.container
    where = "container.connection_uri" if c.connection_uri else "container.engine"
    try:
        engine = connect(c.engine.value, c.connection_uri, ENGINE_TIMEOUT_S)
        engine.ping()
    except RfsError as exc:
        return [Problem(where, exc.message, file)]
    problems = []
    if c.oci_runtime is not None:
        try:
            engine.check_runtime(c.oci_runtime)
        except RfsError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            problems.append(Problem("container.oci_runtime", f"{exc.message}{hint}", file))
    if c.image is None or not c.image.name or not c.image.tag:
        return problems  # the archive form, or an image the schema already reported
    try:
        engine.check_base(c.image.name, c.image.tag)
    except RfsError as exc:
        problems.append(Problem("container.image", exc.message, file))
    return problems
