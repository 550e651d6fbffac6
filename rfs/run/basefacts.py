"""What the engine contributes to the keys: the base image's ID and platform, and the engine's
version. Asked over the engine's socket without the docker SDK when it can (an up-to-date
build), else through the engine client, which also pulls or loads the base."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rfs.errors import EnvironmentProblem, RfsError
from rfs.run.snapshot import PackageChanged, PackageSnapshot
from rfs.script.dockerfrom import from_images, split_ref
from rfs.script.model import BuildScript
from rfs.script.package import resolve_reference

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.script.buildcontext import ContextEntry

BASE_REPO = "rfs/base"


@dataclass(frozen=True)
class EngineFacts:
    """What the engine contributes to the keys: the base image and how it exports."""

    base_id: str  # the image ID the first command runs on
    platform: str  # "os/architecture[/variant]" of that image
    engine_version: str  # the engine's server version


@dataclass(frozen=True)
class DockerfileBase:
    """A `container.dockerfile` base as planned: the digest of what it is built from
    (`rfs.graph.compiler.dockerfile_tag_key`), the context entries the engine is sent, and
    the tag of its image (`rfs.run.executors.layer_tag`: each cache owns its images, and
    `rfs cache prune|clear` removes them with the entry the build records under `key`)."""

    key: str
    entries: Sequence[ContextEntry]
    tag: str  # the image built from exactly these inputs, in the cache's layer namespace
    fresh: bool = False  # rfs build --no-cache: built again when the build executes
    from_refs: tuple[str, ...] = ()  # the images its stages refer to, as keyed


def from_image_facts(
    script: BuildScript,
    text: bytes,
    engine: Callable[[], Engine],
    *,
    quick: bool,
    pull: bool = False,
) -> dict[str, dict[str, str]]:
    """The ID and platform of each image a `container.dockerfile` base's stages refer to
    (`rfs.script.dockerfrom.from_images` of its `text`), by reference, as the engine resolves
    it: asked over the engine's socket when `quick`, else through the engine client (pulled
    first with `pull`). A missing one is an error naming container.dockerfile and the image:
    the key cannot say what the base is built from."""
    from rfs.engine import default_uri
    from rfs.engine.lite import Unavailable, image_facts

    c = script.container
    refs = from_images(text, dict(c.build_args), c.target)
    uri = c.connection_uri or default_uri(c.engine.value)
    found: dict[str, dict[str, str]] = {}
    for ref in refs:
        if quick and not pull:
            try:
                facts = image_facts(uri, ref)
            except Unavailable:
                facts = _from_image_by_client(engine(), script, ref, pull=False)
        else:
            facts = _from_image_by_client(engine(), script, ref, pull=pull)
        if facts is None:
            raise _missing_from_image(script, ref)
        found[ref] = {"image_id": facts[0], "platform": facts[1]}
    return found


def _from_image_by_client(
    engine: Engine, script: BuildScript, ref: str, *, pull: bool
) -> tuple[str, str] | None:
    if pull:
        name, tag = split_ref(ref)
        try:
            image_id = engine.resolve_base(name, tag, pull=True, platform=script.container.platform)
        except EnvironmentProblem as exc:
            raise EnvironmentProblem(
                f"container.dockerfile ({script.container.dockerfile}): FROM image {ref}: "
                f"{exc.message}",
                hint=exc.hint,
            ) from exc
    else:
        found = engine.image_id(ref)
        if found is None:
            return None
        image_id = found
    return image_id, engine.image_platform(image_id)


def _missing_from_image(script: BuildScript, ref: str) -> EnvironmentProblem:
    c = script.container
    return EnvironmentProblem(
        f"container.dockerfile ({c.dockerfile}): FROM image {ref} is not in the "
        f"{c.engine.value} engine",
        hint=f"make or load it ({c.engine.value} build -t {ref} …, {c.engine.value} load), "
        "or build with --pull to let the engine pull it",
    )


def _base_ref(
    script: BuildScript, digests: Mapping[str, str], built: DockerfileBase | None = None
) -> str | None:
    c = script.container
    if c.archive is not None:
        return f"{BASE_REPO}:{digests[c.archive]}"
    if built is not None:
        return built.tag
    # A pinned image's ref is `name@digest`: the engine finds it only by that digest.
    return c.image.ref if c.image is not None else None


def quick_engine_facts(
    script: BuildScript, digests: Mapping[str, str], built: DockerfileBase | None = None
) -> EngineFacts | None:
    """The engine facts when the engine has the base image locally, asked without the docker
    SDK (two GETs on its unix socket).

    None when the shortcut cannot tell (the image is missing and may need pulling, the engine
    is not on a local socket): then `engine_facts` does it properly.
    """
    from rfs.engine import default_uri
    from rfs.engine.lite import Unavailable, engine_version, image_facts

    c = script.container
    ref = _base_ref(script, digests, built)
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
    built: DockerfileBase | None = None,
) -> EngineFacts:
    """The engine facts through the engine client: the base resolved (pulled if need be, or
    looked up again with `pull`; a Dockerfile built if its image is missing), its platform
    and the engine's version."""
    base_id = resolve_base(engine, script, digests, snapshot, pull=pull, built=built)
    return EngineFacts(base_id, engine.image_platform(base_id), engine.version())


def resolve_base(
    engine: Engine,
    script: BuildScript,
    digests: Mapping[str, str],
    snapshot: PackageSnapshot | None = None,
    *,
    pull: bool = False,
    built: DockerfileBase | None = None,
) -> str:
    """The image ID the first command runs on: `container.image` resolved (pulled if need be,
    looked up in its registry again with `pull`), or `container.archive` brought into the
    engine once and kept as `rfs/base:<digest>`.

    The archive's content digest (`digests`, from the package) names it, so an unchanged
    archive is neither reread nor reloaded, and an edited one is loaded again. A
    `container.dockerfile` base is built once per `built.key` and kept as `built.tag`.
    """
    c = script.container
    if built is not None:
        return _build_dockerfile(engine, script, built, snapshot)
    if c.archive is None:
        assert c.image is not None  # the schema requires one of them
        if c.image.digest is not None:
            return _resolve_pinned(
                engine, c.image.name, c.image.digest, pull=pull, platform=c.platform
            )
        return engine.resolve_base(c.image.name, c.image.tag, pull=pull, platform=c.platform)
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


def rebuild_dockerfile_base(
    engine: Engine, script: BuildScript, built: DockerfileBase, snapshot: PackageSnapshot | None
) -> str:
    """Build a `container.dockerfile` base again, every instruction (`rfs build --no-cache`),
    moving its tag to the new image; return its ID."""
    return _build_dockerfile(engine, script, built, snapshot, fresh=True)


def _build_dockerfile(
    engine: Engine,
    script: BuildScript,
    built: DockerfileBase,
    snapshot: PackageSnapshot | None,
    *,
    fresh: bool = False,
) -> str:
    """The image of a `container.dockerfile` base: the one tagged with its key, else (or
    `fresh`) built from the context tar of the build's checked copies of the package files."""
    import tempfile

    from rfs.script.buildcontext import dockerfile_name, write_context

    found = None if fresh else engine.image_id(built.tag)
    if found is not None:
        return found
    c = script.container
    assert c.dockerfile is not None and script.package_root is not None
    root = script.package_root

    def copy_of(ref: str) -> Path:
        return snapshot.path(ref) if snapshot is not None else resolve_reference(root, ref)

    # The key holds the images the Dockerfile named when planned: the checked copy built from
    # must name the same ones (an edit in between is caught by its digest only at this point).
    named = from_images(copy_of(c.dockerfile).read_bytes(), dict(c.build_args), c.target)
    if named != list(built.from_refs):
        raise PackageChanged(
            f"package path {c.dockerfile} changed after rfs planned this build; nothing was "
            "recorded under its old content: run the build again to use the new one"
        )
    with tempfile.TemporaryFile() as tar:
        write_context(script, list(built.entries), copy_of, tar)
        tar.seek(0)
        return engine.build_image(
            tar,
            dockerfile=dockerfile_name(script),
            tag=built.tag,
            step=f"base (container.dockerfile {c.dockerfile})",
            build_args=dict(c.build_args),
            target=c.target,
            no_cache=fresh,
            platform=c.platform,
        )


def _resolve_pinned(
    engine: Engine, name: str, digest: str, *, pull: bool, platform: str | None
) -> str:
    """The image `container.image` pins: a local one whose repo digests hold `name@digest`
    (pulled images), or whose ID is `digest` (images made locally have no repo digests);
    else pulled as `name@digest`, which the registry serves only with that content."""
    if not pull:
        found = engine.image_id(f"{name}@{digest}")
        if found is not None:
            return found
        if engine.image_id(digest) == digest:
            return digest
    try:
        return engine.resolve_base(name, digest, pull=pull, platform=platform)
    except EnvironmentProblem as exc:
        raise EnvironmentProblem(
            f"container.image.digest: no image {name}@{digest}: none in the {engine.name} "
            f"engine has that digest, and pulling it failed ({exc.message})",
            hint="check the digest (docker images --digests), or load the image it names",
        ) from exc
