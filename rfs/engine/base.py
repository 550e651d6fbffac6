"""What rfs asks of a container engine: the `Engine` protocol and the plain data it takes.

Nothing here imports an engine SDK, so planning and unit tests can use these types (and fake
engines) without a daemon. `rfs.engine.connect` returns the real implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future

    from rfs.engine.layerdiff import Limit

#: Every container rfs creates carries this label (value "1"), so leftovers of a crashed or
#: killed build can be found and removed by label.
MANAGED_LABEL = "org.rfs.managed"

#: Containers that only try whether the engine starts one (a privileged probe) also carry this
#: label, with what they probe as its value.
PROBE_LABEL = "org.rfs.probe"

#: An immutable empty mapping, for defaults that must not be shared mutable dicts.
EMPTY: Mapping[str, str] = MappingProxyType({})


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    # A private read-only copy: a caller mutating its dict later must not change a spec that
    # may already have been hashed into a cache key.
    return MappingProxyType(dict(mapping))


class BinarySink(Protocol):
    """Where an export goes: anything with `write(bytes)`, e.g. a file opened "wb"."""

    def write(self, data: bytes, /) -> object: ...


class CopySource(Protocol):
    """Files to place into a container before it starts (rfs.run.copyin.CopyIn)."""

    def write(self, out: BinaryIO, resolve: Callable[[str], str | None]) -> int:
        """Write them as a tar archive to extract at `/`; `resolve(path)` gives the directory
        a symlink at container path `path` leads to (None: not a symlink to a directory)."""
        ...


@dataclass(frozen=True)
class Mount:
    """A host file or directory bind-mounted into the step's container (read-only by default)."""

    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True)
class RunSpec:
    """How to run one setup command in a fresh container.

    `argv` runs without a shell and with the image's entrypoint cleared, so images without a
    default command work. `env` and `labels` are copied into read-only mappings.
    """

    image: str
    argv: tuple[str, ...]
    user: str | None = None
    working_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    privileged: bool = False
    mounts: tuple[Mount, ...] = ()
    hostname: str | None = None
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    runtime: str | None = None
    timeout_s: float | None = None
    stop_timeout_s: int = 10
    network: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    copy_in: CopySource | None = None  # placed into the container before it starts
    # "os/arch[/variant]" the container must run as (container.platform): Docker refuses an
    # image of another one; None: the image's own
    platform: str | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience but stored as tuples, keeping the spec immutable.
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "mounts", tuple(self.mounts))
        object.__setattr__(self, "cap_add", tuple(self.cap_add))
        object.__setattr__(self, "cap_drop", tuple(self.cap_drop))
        object.__setattr__(self, "env", _frozen(self.env))
        object.__setattr__(self, "labels", _frozen(self.labels))
        if not self.argv:
            raise ValueError("RunSpec.argv must name a command")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("RunSpec.timeout_s must be positive")
        if self.stop_timeout_s < 0:
            raise ValueError("RunSpec.stop_timeout_s must not be negative")


class Engine(Protocol):
    """A container engine as rfs uses it. Implementations raise only `rfs.errors` exceptions.

    Every container an engine creates is labelled `org.rfs.managed=1` plus the caller's labels
    and is removed before the method returns, whatever happens; but for the container of a
    command that succeeded, whose removal may still be under way (`settle`).
    """

    name: str  # "docker" or "podman"
    local: bool  # the engine runs on this machine, so host paths can be bind-mounted

    def ping(self) -> None:
        """Check that the engine answers; raise EngineError saying how to fix it if not."""
        ...

    def version(self) -> str:
        """The engine's server version, e.g. "20.10.24"."""
        ...

    def image_id(self, ref: str) -> str | None:
        """The local image ID ("sha256:...") of a tag or ID, or None if absent. Never pulls."""
        ...

    def image_size(self, ref: str) -> int | None:
        """The size in bytes of image `ref`'s files (all its layers), or None if unknown: about
        what an export of it will stream."""
        ...

    def image_platform(self, ref: str) -> str:
        """ "os/architecture[/variant]" of local image `ref` ("" if the engine does not say)."""
        ...

    def resolve_base(
        self, name: str, tag: str, *, pull: bool = False, platform: str | None = None
    ) -> str:
        """The image ID of base image `name:tag`: local if present, else pulled.

        `pull`: ask the registry even when the image is local (`rfs build --pull`), failing
        with EnvironmentProblem when no registry answers. `platform`: pull that platform's
        image (`container.platform`; a multi-platform tag resolves to it), else the host's.
        Raises EnvironmentProblem quickly when it is neither present nor pullable.
        """
        ...

    def check_base(self, name: str, tag: str, platform: str | None = None) -> None:
        """Raise EnvironmentProblem unless `name:tag` is local or a registry has it (rfs check).

        Docker asks the registry without pulling; Podman's API cannot, so it pulls (for
        `platform`, as the build would).
        """
        ...

    def check_runtime(self, runtime: str) -> None:
        """Raise EnvironmentProblem unless commands can run with the OCI runtime `runtime`."""
        ...

    def import_archive(self, path: str, *, image: bool) -> str:
        """Bring a base image tarball into the engine and return its image ID.

        `image`: a `docker save`/OCI archive, loaded as it is (with the tags it carries);
        otherwise a root filesystem tarball, imported as a one-layer image without config.
        """
        ...

    def has_tag(self, tag: str) -> bool:
        """Whether `tag` names an image in the engine."""
        ...

    def build_image(
        self,
        context: BinaryIO,
        *,
        dockerfile: str,
        tag: str,
        step: str,
        build_args: Mapping[str, str] = EMPTY,
        target: str | None = None,
        on_output: Callable[[bytes], None] | None = None,
        no_cache: bool = False,
        platform: str | None = None,
    ) -> str:
        """Build the Dockerfile `dockerfile` (a path inside the context) from the context tar
        read from `context`, tag the result `tag` and return its image ID.

        Nothing is pulled (bases are local) and no intermediate container is left. A failing
        instruction raises StepFailed naming `step` and the instruction. `no_cache`: every
        instruction runs again (`docker build --no-cache`). `platform`: build for it
        (`docker build --platform`; its FROM images must be of it).
        """
        ...

    def run_and_commit(
        self,
        spec: RunSpec,
        *,
        step: str,
        tag: str,
        on_output: Callable[[bytes], None],
        keep_failed: bool = False,
        on_exited: Callable[[str], Future[Any] | None] | None = None,
    ) -> str:
        """Run `spec.argv` in a container, stream its output, commit it as `tag`.

        Returns the committed image ID. Raises StepFailed (with the output's last lines) when
        the command exits non-zero or outlives `spec.timeout_s`, StartFailed when it cannot
        start. With
        `keep_failed`, a command that ran and failed leaves its container, stopped, named by
        `StepFailed.container`. `on_exited` is called with the container's ID once the
        command succeeded, before the commit; what it starts may read the container
        (`export_container`) until the future it returns ends.
        """
        ...

    def probe_start(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool,
        labels: Mapping[str, str] = EMPTY,
    ) -> str | None:
        """Start a short-lived container of the local `image` running `argv` (no network,
        nothing mounted) and remove it. Returns the runtime's start error, or None when the
        container started (whatever `argv` then did)."""
        ...

    def export(
        self,
        image: str,
        dest: BinarySink,
        *,
        labels: Mapping[str, str] = EMPTY,
        on_progress: Callable[[int], None] | None = None,
        platform: str | None = None,
    ) -> None:
        """Stream the flattened filesystem of `image` as a tarball into `dest`.

        `on_progress` receives the running byte count. `platform`: the container that is
        exported is created for it (`container.platform`), as the commands' are.
        """
        ...

    def export_container(
        self, cid: str, dest: BinarySink, *, on_progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream the filesystem of the stopped container `cid` (`run_and_commit`'s
        `on_exited`) as a tarball into `dest`: the export of the image it is committed as."""
        ...

    def exports_as_committed(self, cid: str, over: Limit | None) -> bool:
        """Whether the stopped container `cid` exports as the image it is committed as (a
        command can change what the engine masks in every container) and, with `over`, what
        it changed holds more than `over` (an estimate that reads no file); False when the
        engine cannot tell."""
        ...

    def save_image(self, ref: str, dest: BinarySink) -> None:
        """Stream `ref` with its parent layers as an image tarball (`docker save`) into `dest`."""
        ...

    def load_image(self, source: BinaryIO) -> list[str]:
        """Load an image tarball (`docker load`) read from `source`; return the loaded refs."""
        ...

    def image_layers(self, ref: str) -> list[str]:
        """The diff IDs of `ref`'s layers, base first."""
        ...

    def layer_diff(self, image: str, dest: BinaryIO, limit: Limit, *, new_layer: bool) -> bool:
        """Write what the command committed as `image` changed (its top layer; nothing unless
        `new_layer`) to `dest` in the normalised form of rfs.engine.layerdiff; False, with
        `dest` emptied, when it is over `limit`."""
        ...

    def tag(self, image_id: str, tag: str) -> None:
        """Point `tag` at `image_id` (moving it if it exists)."""
        ...

    def remove_image(self, ref: str) -> None:
        """Remove (or untag) an image; a missing image is not an error."""
        ...

    def container_labels(self, label: str) -> dict[str, dict[str, str]]:
        """The labels of every container carrying `label` (a key or "key=value"), by ID."""
        ...

    def remove_containers(self, label: str, *, keep: Collection[str] = ()) -> int:
        """Force-remove every container carrying `label` ("key=value" or "key") except the
        ones whose full ID is in `keep`; return the count. Settles first (`settle`)."""
        ...

    def settle(self) -> None:
        """Wait until the containers of the commands that succeeded are removed."""
        ...
