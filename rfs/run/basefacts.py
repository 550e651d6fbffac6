"""What the engine contributes to the keys: the base image's ID and platform, and the engine's
version. Asked over the engine's socket without the docker SDK when it can (an up-to-date
build), else through the engine client, which also pulls or loads the base."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rfs.errors import RfsError
from rfs.script.model import BuildScript
from rfs.script.package import resolve_reference

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.run.snapshot import PackageSnapshot

BASE_REPO = "rfs/base"


@dataclass(frozen=True)
class EngineFacts:
    """What the engine contributes to the keys: the base image and how it exports."""

    base_id: str  # the image ID the first command runs on
    platform: str  # "os/architecture[/variant]" of that image
    engine_version: str  # the engine's server version


def _base_ref(script: BuildScript, digests: Mapping[str, str]) -> str | None:
    c = script.container
    if c.archive is not None:
        return f"{BASE_REPO}:{digests[c.archive]}"
    return c.image.ref if c.image is not None else None


def quick_engine_facts(script: BuildScript, digests: Mapping[str, str]) -> EngineFacts | None:
    """The engine facts when the engine has the base image locally, asked without the docker
    SDK (two GETs on its unix socket).

    None when the shortcut cannot tell (the image is missing and may need pulling, the engine
    is not on a local socket): then `engine_facts` does it properly.
    """
    from rfs.engine import default_uri
    from rfs.engine.lite import Unavailable, engine_version, image_facts

    c = script.container
    ref = _base_ref(script, digests)
    if ref is None:
        return None
    uri = c.connection_uri or default_uri(c.engine.value)
    try:
        found = image_facts(uri, ref)
        if found is None:
            return None
        return EngineFacts(found[0], found[1], engine_version(uri))
    except (Unavailable, RfsError):
        return None


def engine_facts(
    engine: Engine,
    script: BuildScript,
    digests: Mapping[str, str],
    snapshot: PackageSnapshot | None = None,
    *,
    pull: bool = False,
) -> EngineFacts:
    """The engine facts through the engine client: the base resolved (pulled if need be, or
    looked up again with `pull`), its platform and the engine's version."""
    base_id = resolve_base(engine, script, digests, snapshot, pull=pull)
    return EngineFacts(base_id, engine.image_platform(base_id), engine.version())


def resolve_base(
    engine: Engine,
    script: BuildScript,
    digests: Mapping[str, str],
    snapshot: PackageSnapshot | None = None,
    *,
    pull: bool = False,
) -> str:
    """The image ID the first command runs on: `container.image` resolved (pulled if need be,
    looked up in its registry again with `pull`), or `container.archive` brought into the
    engine once and kept as `rfs/base:<digest>`.

    The archive's content digest (`digests`, from the package) names it, so an unchanged
    archive is neither reread nor reloaded, and an edited one is loaded again.
    """
    c = script.container
    if c.archive is None:
        assert c.image is not None  # the schema requires one of them
        return engine.resolve_base(c.image.name, c.image.tag, pull=pull)
    from rfs.script.basearchive import inspect_base_archive

    tag = f"{BASE_REPO}:{digests[c.archive]}"
    found = engine.image_id(tag)
    if found is not None:
        return found
    if snapshot is not None:  # the copy whose digest names the tag, not the live file
        path = snapshot.path(c.archive)
    else:
        assert script.package_root is not None
        path = resolve_reference(script.package_root, c.archive)
    archive = inspect_base_archive(path)
    image_id = engine.import_archive(str(path), image=archive.is_image)
    if archive.image_id is not None and engine.image_id(archive.image_id) is not None:
        image_id = archive.image_id  # the manifest's config digest: what was loaded
    engine.tag(image_id, tag)
    return image_id
