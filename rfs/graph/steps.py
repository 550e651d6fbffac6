"""Steps of a build graph and the facts their keys depend on."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Bump when the meaning of a key's inputs changes, so old cache entries stop matching. (The
# code that makes each artifact is keyed by its own digest: see rfs.graph.codeversion.)
KEY_VERSION = 2


class StepKind(enum.Enum):
    """What a step produces."""

    BASE = "base"  # the base image, by ID
    RUN = "run"  # a committed layer image
    EXPORT = "export"  # the export tarball of the last layer
    DIFF = "diff"  # what a command changed, or its layer's export (ext4: rfs.run.layerchain)
    OVERLAYS = "overlays"  # the set of overlay files (content hashes, destinations, modes)
    ASSEMBLE = "assemble"  # the filesystem image


@dataclass(frozen=True)
class Step:
    """One node of the build graph.

    `inputs` is the step's own manifest: canonical JSON-able data that, with the parents'
    keys, determines `key`. Keeping it lets a later build say exactly what changed.
    """

    id: str
    kind: StepKind
    label: str
    inputs: Mapping[str, Any]
    parents: tuple[str, ...]
    key: str
    index: int | None = None  # the command index, for RUN steps
    # Facts shown in explanations but deliberately left out of the key (the base image's tag).
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Facts:
    """What the compiler needs from the outside world, gathered before compiling.

    Keeping I/O out of the compiler makes it a pure function, testable without an engine.
    """

    base_id: str
    file_digests: Mapping[str, str] = field(default_factory=dict)  # package ref -> digest
    mkfs_version: str = ""
    engine: str = "docker"
    source_date_epoch: int = 0
    # "os/architecture[/variant]" of the base image: what every command runs as.
    platform: str = ""
    engine_version: str = ""  # the engine's server version (the export's bytes depend on it)
    network: bool = True  # commands may reach the network (rfs build --no-network: False)
    # Step kind -> digest of the rfs code that shapes its artifacts (rfs.graph.codeversion).
    code: Mapping[str, str] = field(default_factory=dict)
    # A `container.dockerfile` base: name -> digest of each build context entry the engine
    # sees (after .dockerignore; rfs.script.buildcontext).
    context: Mapping[str, str] = field(default_factory=dict)
    # A `container.dockerfile` base: each image its stages refer to (FROM, COPY --from) ->
    # {"image_id", "platform"} as the engine resolves it (rfs.run.basefacts.from_image_facts).
    from_images: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
