"""Turn a parsed document (dict) into a BuildScript, collecting every problem with its path.

Nothing here touches the filesystem: package files are checked by `package.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from rfs.errors import Problem, ScriptError
from rfs.script.model import (
    BuildScript,
    Command,
    Container,
    EngineKind,
    Export,
    Filesystem,
    FsType,
    ImageRef,
    Overlay,
    PathSet,
)
from rfs.script.platform import FORM, is_platform
from rfs.script.reader import Reader, _kind
from rfs.script.recipes import copy_entry, output_entry

# The names a build script may have in a package directory, in order of preference.
SCRIPT_NAMES = ("build.toml", "build.yaml", "build.yml")

T = TypeVar("T")

_FS_TYPES = {t.value: t for t in FsType}
_ENGINES = {e.value: e for e in EngineKind}

_KEYS: dict[str, tuple[str, ...]] = {
    "": ("filesystem", "container", "copy", "commands", "overlays", "outputs", "export"),
    "filesystem": (
        "type",
        "size_mib",
        "block_size_mib",
        "dd_block_size_mib",
        "dd_args",
        "mkfs_args",
        "all_root",
    ),
    "container": (
        "engine",
        "image",
        "archive",
        "dockerfile",
        "context",
        "build_args",
        "target",
        "platform",
        "rootful",
        "wait_timeout_s",
        "connection_uri",
        "volumes",
        "env",
        "hostname",
        "oci_runtime",
        "timeout",
        "cap_add",
        "cap_drop",
        "uid",
        "gid",
        "working_dir",
    ),
    "copy": ("source", "destination", "mode", "uid", "gid"),
    "outputs": ("path", "to", "remove"),
    "image": ("name", "tag", "digest"),
    "commands": (
        "command",
        "script_inline",
        "script_path",
        "uid",
        "gid",
        "working_dir",
        "privileged",
        "env",
        "max_age",
        "no_cache",
    ),
    "overlays": (
        "source",
        "source_inline",
        "destination",
        "is_directory",
        "mounted",
        "mode",
        "uid",
        "gid",
    ),
    "export": ("files", "directories"),
    "pathset": ("include", "create", "exclude"),
}

# Where Docker, Podman and containerd put their API sockets: no volume may land there.
ENGINE_SOCKETS = frozenset(
    {
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/podman/podman.sock",
        "/var/run/podman/podman.sock",
        "/run/containerd/containerd.sock",
        "/var/run/containerd/containerd.sock",
        "/run/user/0/podman/podman.sock",
    }
)

# Far beyond any microVM image; catches typos such as a size given in bytes.
MAX_SIZE_MIB = 16 * 1024 * 1024
# The smallest filesystem each mkfs accepts, so `rfs check` says so before a long build: mkfs.btrfs
# (btrfs-progs 5.x/6.x) refuses devices under 114294784 bytes (109 MiB) and mkfs.xfs (xfsprogs
# 5.19 on) under 300 MB; mke2fs makes 1 MiB (measured with 1.47.2; no journal below 8 MiB).
# squashfs and erofs images are sized by their content.
MIN_SIZE_MIB: dict[FsType, int] = {FsType.BTRFS: 109, FsType.XFS: 300}
# Read-only images, where owners can be made root without breaking a running system.
ALL_ROOT_TYPES = frozenset({FsType.SQUASHFS, FsType.EROFS})


def _enum(
    r: Reader, data: Mapping[str, Any], key: str, path: str, values: Mapping[str, T], default: T
) -> T:
    raw = r.text(data, key, path)
    if raw is None:
        return default
    found = values.get(raw.lower())
    if found is None:
        r.error(
            path,
            f"unknown value {raw!r}; expected one of " + ", ".join(v.capitalize() for v in values),
        )
        return default
    return found


def _filesystem(r: Reader, data: Mapping[str, Any]) -> Filesystem:
    p = "filesystem"
    r.check_keys(data, "filesystem", p)
    size = r.count(data, "size_mib", f"{p}.size_mib", minimum=1, maximum=MAX_SIZE_MIB)
    block = r.count(data, "block_size_mib", f"{p}.block_size_mib", minimum=1)
    if block is None:
        block = r.count(data, "dd_block_size_mib", f"{p}.dd_block_size_mib", minimum=1)
    if size is not None and block is not None and size % block:
        r.error(f"{p}.block_size_mib", f"{block} does not divide size_mib {size}")
    fs_type = _enum(r, data, "type", f"{p}.type", _FS_TYPES, FsType.EXT4)
    minimum = MIN_SIZE_MIB.get(fs_type, 1)
    if size is not None and size < minimum:
        r.error(
            f"{p}.size_mib",
            f"{size} MiB is below the smallest {fs_type.value} filesystem "
            f"mkfs can make ({minimum} MiB)",
        )
    all_root = r.get(data, "all_root", f"{p}.all_root", bool, False)
    if all_root and fs_type not in ALL_ROOT_TYPES:
        r.error(
            f"{p}.all_root",
            f"only Squashfs and Erofs images take it, not "
            f"{fs_type.value.capitalize()} (a writable image keeps the "
            "owners the commands gave)",
        )
    return Filesystem(
        type=fs_type,
        size_mib=size,
        block_size_mib=block,
        dd_args=r.strings(data, "dd_args", f"{p}.dd_args"),
        mkfs_args=r.strings(data, "mkfs_args", f"{p}.mkfs_args"),
        all_root=all_root,
    )


# What an image digest looks like (the only algorithm engines and registries use for IDs).
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A Dockerfile stage name (docker's rule: a letter, then letters, digits, `_`, `.`, `-`).
_STAGE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_BASES = ("image", "archive", "dockerfile")
_BASE_FORMS = (
    'image = { name = "...", tag = "..." }, archive = "/path/in/package.tar" '
    'or dockerfile = "/Dockerfile"'
)


def _base(r: Reader, data: Mapping[str, Any]) -> ImageRef | None:
    """Check that exactly one base is given; return `image` parsed, if it is the one."""
    p = "container"
    given = [k for k in _BASES if data.get(k) is not None]
    if not given:
        r.error(f"{p}.image", f"is required: give one base image, {_BASE_FORMS}")
    for extra in given[1:]:
        r.error(
            f"{p}.{extra}",
            f"conflicts with container.{given[0]}: give one base image, {_BASE_FORMS}",
        )
    if data.get("dockerfile") is None:
        for key in ("context", "build_args", "target"):
            if data.get(key) is not None:
                r.error(f"{p}.{key}", 'only applies with container.dockerfile = "/Dockerfile"')
    image = r.table(data, "image", f"{p}.image")
    if image is None:
        return None
    r.check_keys(image, "image", f"{p}.image")
    name = r.text(image, "name", f"{p}.image.name")
    tag = r.text(image, "tag", f"{p}.image.tag")
    digest = r.text(image, "digest", f"{p}.image.digest")
    if not name:
        r.error(f"{p}.image.name", "is required")
    if digest is not None:
        if not _DIGEST.fullmatch(digest):
            r.error(
                f"{p}.image.digest",
                f'must be "sha256:" and 64 lowercase hex digits, not {digest!r}',
            )
            digest = None
        if tag is not None:
            r.error(f"{p}.image.tag", "conflicts with image.digest: pin by digest or name a tag")
    elif not tag:
        r.error(f"{p}.image.tag", "is required")
    return ImageRef(name or "", tag or "", digest)


def _container(r: Reader, data: Mapping[str, Any]) -> Container:
    p = "container"
    r.check_keys(data, "container", p)
    image = _base(r, data)
    archive = r.image_path(data, "archive", f"{p}.archive")
    dockerfile = r.image_path(data, "dockerfile", f"{p}.dockerfile")
    context = r.image_path(data, "context", f"{p}.context")
    stage = r.text(data, "target", f"{p}.target")
    if stage is not None and not _STAGE.fullmatch(stage):
        r.error(f"{p}.target", f"{stage!r} is not a stage name (FROM ... AS <name>)")
    platform = r.text(data, "platform", f"{p}.platform")
    if platform is not None and not is_platform(platform):
        r.error(f"{p}.platform", f"{platform!r} is not {FORM}")
        platform = None
    volumes = []
    for host, target in r.mapping(data, "volumes", f"{p}.volumes"):
        hp = r.check_abs(host, f"{p}.volumes.{host}")
        tp = r.check_abs(target, f"{p}.volumes.{host}")
        if tp in ENGINE_SOCKETS:
            # Whatever the package puts there, a script must never find an engine socket
            # where tools look for one.
            r.error(
                f"{p}.volumes.{host}",
                f"{tp} is where a container engine's socket lives; rfs never mounts anything there",
            )
        elif hp and tp:
            volumes.append((hp, tp))
    return Container(
        image=image,
        archive=archive,
        dockerfile=dockerfile,
        context=context or "/",
        build_args=r.mapping(data, "build_args", f"{p}.build_args"),
        target=stage,
        platform=platform,
        engine=_enum(r, data, "engine", f"{p}.engine", _ENGINES, EngineKind.DOCKER),
        rootful=r.get(data, "rootful", f"{p}.rootful", bool, False),
        wait_timeout_s=r.count(data, "wait_timeout_s", f"{p}.wait_timeout_s"),
        connection_uri=r.text(data, "connection_uri", f"{p}.connection_uri"),
        volumes=tuple(sorted(volumes)),
        env=r.mapping(data, "env", f"{p}.env"),
        hostname=r.text(data, "hostname", f"{p}.hostname"),
        oci_runtime=r.text(data, "oci_runtime", f"{p}.oci_runtime"),
        timeout=r.count(data, "timeout", f"{p}.timeout", minimum=1),
        cap_add=r.strings(data, "cap_add", f"{p}.cap_add"),
        cap_drop=r.strings(data, "cap_drop", f"{p}.cap_drop"),
        uid=r.count(data, "uid", f"{p}.uid"),
        gid=r.count(data, "gid", f"{p}.gid"),
        working_dir=r.image_path(data, "working_dir", f"{p}.working_dir"),
    )


def _command(r: Reader, data: Mapping[str, Any], p: str) -> Command:
    r.check_keys(data, "commands", p)
    forms = [k for k in ("command", "script_inline", "script_path") if data.get(k) is not None]
    if len(forms) != 1:
        found = ", ".join(forms) if forms else "none"
        r.error(p, f"needs exactly one of command, script_inline, script_path (found: {found})")
    command = r.text(data, "command", f"{p}.command")
    inline = r.text(data, "script_inline", f"{p}.script_inline")
    if command is not None and not command.split():
        r.error(f"{p}.command", "is empty")
    if inline is not None and not inline.strip():
        r.error(f"{p}.script_inline", "is empty")
    return Command(
        command=command,
        script_inline=inline,
        script_path=r.image_path(data, "script_path", f"{p}.script_path"),
        uid=r.count(data, "uid", f"{p}.uid"),
        gid=r.count(data, "gid", f"{p}.gid"),
        working_dir=r.image_path(data, "working_dir", f"{p}.working_dir"),
        privileged=r.get(data, "privileged", f"{p}.privileged", bool, False),
        env=r.mapping(data, "env", f"{p}.env"),
        max_age_s=_duration(r, data, "max_age", f"{p}.max_age"),
        no_cache=r.get(data, "no_cache", f"{p}.no_cache", bool, False),
    )


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int | None:
    """Seconds in "90s", "30m", "12h", "1d", "2w" or a bare number of seconds; None if not a
    duration."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if match is None:
        return None
    return int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def _duration(r: Reader, data: Mapping[str, Any], key: str, path: str) -> int | None:
    """A positive duration: a string such as "24h" or a number of seconds."""
    value = data.get(key)
    if value is None:
        return None
    seconds = (
        value
        if isinstance(value, int) and not isinstance(value, bool)
        else parse_duration(value)
        if isinstance(value, str)
        else None
    )
    if seconds is None or seconds <= 0:
        r.error(path, f'must be a duration such as "24h", "30m" or "7d", not {value!r}')
        return None
    return seconds


def _overlay(r: Reader, data: Mapping[str, Any], p: str) -> Overlay:
    r.check_keys(data, "overlays", p)
    has_source = data.get("source") is not None
    has_inline = data.get("source_inline") is not None
    if has_source == has_inline:
        r.error(p, "needs exactly one of source, source_inline")
    destination = r.image_path(data, "destination", f"{p}.destination")
    if data.get("destination") is None:
        r.error(f"{p}.destination", "is required")
    is_dir = r.get(data, "is_directory", f"{p}.is_directory", bool, False)
    if is_dir and has_inline:
        r.error(f"{p}.is_directory", "cannot be used with source_inline")
    mode = r.count(data, "mode", f"{p}.mode", maximum=0o7777)
    return Overlay(
        destination=destination or "",  # "": invalid, reported already
        source=r.image_path(data, "source", f"{p}.source"),
        source_inline=r.text(data, "source_inline", f"{p}.source_inline"),
        is_directory=is_dir,
        mounted=r.get(data, "mounted", f"{p}.mounted", bool, False),
        mode=mode,
        uid=r.count(data, "uid", f"{p}.uid"),
        gid=r.count(data, "gid", f"{p}.gid"),
    )


def _pathset(r: Reader, data: Mapping[str, Any] | None, p: str) -> PathSet:
    if data is None:
        return PathSet()
    r.check_keys(data, "pathset", p)

    def paths(key: str) -> tuple[str, ...]:
        out = []
        for i, raw in enumerate(r.strings(data, key, f"{p}.{key}")):
            checked = r.check_abs(raw, f"{p}.{key}[{i}]")
            if checked:
                out.append(checked)
        return tuple(out)

    return PathSet(
        include=paths("include"),
        create=paths("create"),
        exclude=r.strings(data, "exclude", f"{p}.exclude"),
    )


def _list_of_tables(
    r: Reader,
    data: Mapping[str, Any],
    key: str,
    parse: Callable[[Reader, Mapping[str, Any], str], T],
) -> tuple[T, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        r.error(key, f"must be an array of tables ([[{key}]]), not {_kind(value)}")
        return ()
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            r.error(f"{key}[{i}]", f"must be a table, not {_kind(item)}")
            continue
        out.append(parse(r, item, f"{key}[{i}]"))
    return tuple(out)


def parse_script(
    doc: Any, *, file: str = "build.toml", package_root: Path | None = None
) -> tuple[BuildScript, list[Problem]]:
    """Validate `doc` and build the model; raise ScriptError listing every error.

    Returns the model and the warnings (unknown keys and the like) for the caller to show.
    """
    script, problems = collect_script(doc, file=file, package_root=package_root)
    if any(p.severity == "error" for p in problems):
        raise ScriptError(problems)
    return script, problems


def collect_script(
    doc: Any, *, file: str = "build.toml", package_root: Path | None = None
) -> tuple[BuildScript, list[Problem]]:
    """Build the model as far as possible and return it with every problem found.

    Fields with errors get defaults, so later checks (package files) can still run and the
    user sees everything at once; callers must not use the model when errors were found.
    """
    r = Reader(file, _KEYS)
    if doc is None:  # YAML reads an empty file as null
        raise ScriptError(
            [Problem("", "is empty: a build script needs at least [container]", file)]
        )
    if not isinstance(doc, Mapping):
        raise ScriptError(
            [Problem("", f"must be a table at the top level, not {_kind(doc)}", file)]
        )
    r.check_keys(doc, "", "")
    fs_data = r.table(doc, "filesystem", "filesystem")
    container_data = r.table(doc, "container", "container")
    if container_data is None and "container" not in doc:
        r.error("container", "is required ([container] with image = { name, tag })")
    export_data = r.table(doc, "export", "export") or {}
    if export_data:
        r.check_keys(export_data, "export", "export")
    export = Export(
        files=_pathset(r, r.table(export_data, "files", "export.files"), "export.files"),
        directories=_pathset(
            r, r.table(export_data, "directories", "export.directories"), "export.directories"
        ),
    )
    script = BuildScript(
        filesystem=_filesystem(r, fs_data or {}),
        container=_container(r, container_data or {}),
        commands=_list_of_tables(r, doc, "commands", _command),
        overlays=_list_of_tables(r, doc, "overlays", _overlay),
        export=export,
        copies=_list_of_tables(r, doc, "copy", copy_entry),
        outputs=_list_of_tables(r, doc, "outputs", output_entry),
        script_file=Path(file),
        package_root=package_root,
    )
    _check_destinations(r, script)
    if script.copies and not script.commands:
        r.error(
            "copy",
            "places files before the first command, and there is none: use "
            "[[overlays]] to put files into an image without commands",
        )
    tos: dict[str, int] = {}
    overlaid = {o.destination for o in script.overlays}
    for i, out in enumerate(script.outputs):
        if out.remove and out.path in overlaid:
            r.error(
                f"outputs[{i}].remove",
                f"{out.path} is an overlay's destination: leave the "
                "overlay out instead of removing what it adds",
            )
        if out.to and out.to in tos:
            r.error(f"outputs[{i}].to", f"{out.to} is also where outputs[{tos[out.to]}] goes")
        tos.setdefault(out.to, i)
    return script, r.problems


def _check_destinations(r: Reader, script: BuildScript) -> None:
    # Overlays may share a destination (they merge in order, later ones winning); two bind
    # mounts on one path cannot both be seen by a command, so mounted ones may not.
    mounted: dict[str, int] = {}
    for i, overlay in enumerate(script.overlays):
        if not overlay.destination:
            continue  # missing or invalid: said already
        if overlay.destination == "/" and not overlay.is_directory:
            r.error(f"overlays[{i}].destination", "must name a file, not /")
        if not overlay.mounted:
            continue
        if overlay.destination in mounted:
            r.error(
                f"overlays[{i}].mounted",
                f"{overlay.destination} is also where overlays[{mounted[overlay.destination]}] "
                "is mounted; only one overlay per destination can be mounted",
            )
        mounted.setdefault(overlay.destination, i)
