"""What `rfs check` verifies about the machine before any container starts.

The build script and package files are checked by `schema.py` and `package.py`; this module
adds what depends on the host: the filesystem tool, the engine, the base image. Each finding is
a `Problem` located at the field it concerns (`container.image`, `filesystem.type`, …), so a
person sees every problem at once, next to the setting that causes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rfs.errors import Problem, RfsError, ScriptError
from rfs.script.model import BuildScript

if TYPE_CHECKING:
    from rfs.engine.base import Engine

# A person waits for `rfs check`: an engine that does not answer within this is reported.
ENGINE_TIMEOUT_S = 10.0


def environment_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """Every problem of the machine with building `script`, each at the field it concerns."""
    problems = mkfs_problems(script, file)
    problems += platform_problems(script, file)
    problems += base_archive_problems(script, file)
    problems += engine_problems(script, file)
    return problems


SETUP_HINT = (
    "run scripts/setup-host.sh: it installs Debian's qemu-user-static and registers its "
    "binfmt_misc handlers"
)


def emulation_problem(script: BuildScript) -> str | None:
    """Why this host cannot run the commands of `script`'s `container.platform`, or None."""
    c = script.container
    if c.platform is None:
        return None
    from rfs.host.emulation import cannot_run
    from rfs.script.platform import architecture

    why = cannot_run(architecture(c.platform))
    return None if why is None else f"this host cannot run {c.platform} programs: {why}"


def platform_problems(script: BuildScript, file: str = "") -> list[Problem]:
    """The host can run the platform asked for (natively or under emulation)."""
    why = emulation_problem(script)
    return [] if why is None else [Problem("container.platform", f"{why} ({SETUP_HINT})", file)]


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
    from rfs.script.basearchive import inspect_base_archive
    from rfs.script.package import resolve_reference

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
    if c.dockerfile is not None:
        return problems + _from_image_problems(engine, script, file)
    if c.image is None or not c.image.name or not c.image.tag:
        return problems  # the archive form, or an image the schema already reported
    try:
        engine.check_base(c.image.name, c.image.tag, c.platform)
    except RfsError as exc:
        problems.append(Problem("container.image", exc.message, file))
        return problems
    if c.platform is not None:
        problems += _base_platform_problems(engine, script, file)
    field = privilege_field(script)
    if field is not None:
        image = engine.image_id(f"{c.image.name}:{c.image.tag}")
        refusal = None
        if image is not None:  # pulled only by the build (Docker's check asks the registry)
            try:
                refusal = privilege_refusal(engine, image)
            except RfsError as exc:
                problems.append(
                    Problem(field, f"could not try a privileged container: {exc.message}", file)
                )
        if refusal is not None:
            problems.append(Problem(field, privilege_message(engine.name, refusal), file))
    return problems


def _from_image_problems(engine: Engine, script: BuildScript, file: str) -> list[Problem]:
    """Each image a `container.dockerfile`'s stages name must be in the engine (nothing is
    pulled for them but with `rfs build --pull`)."""
    from rfs.script.dockerfrom import from_images
    from rfs.script.package import resolve_reference

    c = script.container
    assert c.dockerfile is not None
    if script.package_root is None:
        return []
    try:
        text = resolve_reference(script.package_root, c.dockerfile).read_bytes()
    except (OSError, ValueError):
        return []  # reported by the package check
    return [
        Problem(
            "container.dockerfile",
            f"FROM image {ref} is not in the {engine.name} engine (make or load it, or build "
            "with --pull to let the engine pull it)",
            file,
        )
        for ref in from_images(text, dict(c.build_args), c.target)
        if engine.image_id(ref) is None
    ]


def _base_platform_problems(engine: Engine, script: BuildScript, file: str) -> list[Problem]:
    """A local base image of another platform than `container.platform` (the build refuses
    it; one the engine would pull is checked by the build)."""
    from rfs.script.platform import matches

    c = script.container
    assert c.image is not None and c.platform is not None
    found = engine.image_platform(c.image.ref)
    if not found or matches(c.platform, found):
        return []
    message = f"the base image {c.image.ref} is {found}, not {c.platform}"
    return [Problem("container.platform", message, file)]


# A command every base image rfs builds on has (busybox, Debian...). Without it both probes
# fail alike and nothing is claimed.
_PROBE_ARGV = ("true",)


def privilege_field(script: BuildScript) -> str | None:
    """The field asking for privileged containers (`container.rootful` or the first
    `commands[i].privileged`), or None when nothing does."""
    if script.container.rootful:
        return "container.rootful"
    return next(
        (f"commands[{i}].privileged" for i, cmd in enumerate(script.commands) if cmd.privileged),
        None,
    )


def privilege_refusal(
    engine: Engine, image: str, labels: Mapping[str, str] | None = None
) -> str | None:
    """How the engine refuses to start a privileged container of `image`, or None.

    Two short-lived containers: a privileged one, then, if it fails to start, the same one
    unprivileged. Only when that one starts is privilege the cause (on a host that is itself a
    restricted container, runc cannot grant every capability: "unable to apply caps:
    operation not permitted"); a failure of both is someone else's (no `true` in the image).
    """
    refused = engine.probe_start(image, _PROBE_ARGV, privileged=True, labels=labels or {})
    if refused is None:
        return None
    if engine.probe_start(image, _PROBE_ARGV, privileged=False, labels=labels or {}) is not None:
        return None
    return refused


def privilege_message(engine_name: str, refusal: str) -> str:
    """The words for a refused privilege, after the field path."""
    return (
        f"asks for privileged containers, and the {engine_name.capitalize()} engine "
        f"refuses to start one here: {refusal}"
    )
