"""The build script as a frozen model: every buildfs field, plus rfs's additions.

Everything here is immutable (frozen dataclasses, tuples, enums) so a model can be hashed into
cache keys and shared between the planner and the executors without defensive copies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class FsType(enum.Enum):
    """Filesystem types an image can be assembled as."""

    EXT4 = "ext4"
    BTRFS = "btrfs"
    SQUASHFS = "squashfs"
    VFAT = "vfat"
    XFS = "xfs"
    EROFS = "erofs"


class EngineKind(enum.Enum):
    """Container engines rfs drives through the Docker Engine API."""

    DOCKER = "docker"
    PODMAN = "podman"


@dataclass(frozen=True)
class Filesystem:
    """`[filesystem]`: what kind of image to produce and how big."""

    type: FsType = FsType.EXT4
    size_mib: int | None = None
    block_size_mib: int | None = None
    dd_args: tuple[str, ...] = ()
    mkfs_args: tuple[str, ...] = ()
    all_root: bool = False  # squashfs/erofs: every file owned by root (mksquashfs -all-root)


@dataclass(frozen=True)
class ImageRef:
    """`[container].image`: a base image by name and tag, or by name and digest (pinned)."""

    name: str
    tag: str
    digest: str | None = None  # "sha256:<64 hex>": the image is pinned to this content

    @property
    def ref(self) -> str:
        """The `name:tag` (or `name@sha256:…`) form the engine understands."""
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Container:
    """`[container]`: the engine, the base image and how build containers run.

    The base image is `image` (a name and tag in the engine or a registry), `archive`
    (a package file: a `docker save` tarball or a root filesystem tarball, for machines
    without a registry) or `dockerfile` (a package file the engine builds, with `context`,
    `build_args` and `target`); the schema makes sure exactly one is set.
    """

    image: ImageRef | None = None
    archive: str | None = None  # package-relative ("/images/base.tar")
    dockerfile: str | None = None  # package-relative ("/Dockerfile")
    context: str = "/"  # package-relative directory sent to the engine with the Dockerfile
    build_args: tuple[tuple[str, str], ...] = ()  # sorted (name, value)
    target: str | None = None  # the stage of a multi-stage Dockerfile to build
    # "os/architecture[/variant]" the base must be and commands run as (None: the engine's)
    platform: str | None = None
    engine: EngineKind = EngineKind.DOCKER
    rootful: bool = False
    wait_timeout_s: int | None = None
    connection_uri: str | None = None
    volumes: tuple[tuple[str, str], ...] = ()  # (package path, container path), sorted
    env: tuple[tuple[str, str], ...] = ()  # sorted (name, value)
    hostname: str | None = None
    oci_runtime: str | None = None
    timeout: int | None = None
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    # Defaults of every command, which each command may override.
    uid: int | None = None
    gid: int | None = None
    working_dir: str | None = None

    @property
    def base_label(self) -> str:
        """The base image as people name it: `name:tag`, `archive /images/base.tar` or
        `Dockerfile /Dockerfile`."""
        if self.archive is not None:
            return f"archive {self.archive}"
        if self.dockerfile is not None:
            return f"Dockerfile {self.dockerfile}" + (
                f" (target {self.target})" if self.target else ""
            )
        return self.image.ref if self.image is not None else "(no image)"


@dataclass(frozen=True)
class Command:
    """One `[[commands]]` entry: exactly one of command, script_inline, script_path."""

    command: str | None = None
    script_inline: str | None = None
    script_path: str | None = None  # package-relative ("/scripts/a.sh")
    uid: int | None = None
    gid: int | None = None
    working_dir: str | None = None
    privileged: bool = False
    env: tuple[tuple[str, str], ...] = ()
    # Not in the key (they cannot change what the command makes, only when it is made again):
    max_age_s: int | None = None  # a cached result older than this is made again
    no_cache: bool = False  # made again on every build

    def effective(self, container: Container) -> tuple[int | None, int | None, str | None]:
        """(uid, gid, working_dir) this command runs with: its own, else `[container]`'s."""
        return (
            self.uid if self.uid is not None else container.uid,
            self.gid if self.gid is not None else container.gid,
            self.working_dir if self.working_dir is not None else container.working_dir,
        )


@dataclass(frozen=True)
class Copy:
    """One `[[copy]]` entry: a package file or tree placed into the container's filesystem
    before the first command (like a Dockerfile COPY), writable by the commands."""

    source: str  # package-relative
    destination: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Output:
    """One `[[outputs]]` entry: a file of the final tree written next to the image."""

    path: str  # in the image
    to: str  # relative to the image's directory
    remove: bool = False  # also left out of the image


@dataclass(frozen=True)
class Overlay:
    """One `[[overlays]]` entry: a file or directory placed into the image after the export."""

    destination: str
    source: str | None = None  # package-relative
    source_inline: str | None = None
    is_directory: bool = False
    mounted: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class PathSet:
    """`[export.files]` or `[export.directories]`."""

    include: tuple[str, ...] = ()
    create: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Export:
    """`[export]`: which parts of the container filesystem go into the image.

    With no `include` in either set the whole container filesystem is kept (buildfs would keep
    nothing, which no user means).
    """

    files: PathSet = field(default_factory=PathSet)
    directories: PathSet = field(default_factory=PathSet)

    @property
    def whole(self) -> bool:
        """True when the whole container filesystem is exported."""
        return not self.files.include and not self.directories.include


@dataclass(frozen=True)
class BuildScript:
    """A loaded, validated build script and the package it came from."""

    filesystem: Filesystem
    container: Container
    commands: tuple[Command, ...] = ()
    overlays: tuple[Overlay, ...] = ()
    export: Export = field(default_factory=Export)
    copies: tuple[Copy, ...] = ()
    outputs: tuple[Output, ...] = ()
    script_file: Path = Path("build.toml")  # for messages
    package_root: Path | None = None  # the package directory; None: parsed without one
    # The .tar/.tar.gz package `package_root` was unpacked from (a temporary directory): the
    # build's identity (its last manifests) and its messages go by this path instead.
    origin: Path | None = None

    @property
    def layered(self) -> bool:
        """Whether the build keeps what each command changed (a DIFF step per command, see
        rfs.run.layerchain) instead of one export of the last layer: ext4 images, which are
        patched with those changes, when there are commands and no side outputs (they read
        one export)."""
        return self.filesystem.type is FsType.EXT4 and bool(self.commands) and not self.outputs
