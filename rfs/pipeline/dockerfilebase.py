"""A `container.dockerfile` base in the pipeline: its context read and keyed while preparing,
its built image recorded like a layer, and built again for `--no-cache`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from rfs.errors import Problem, ScriptError
from rfs.graph.compiler import dockerfile_tag_key
from rfs.graph.steps import Facts
from rfs.run.basefacts import DockerfileBase, rebuild_dockerfile_base
from rfs.run.executors import layer_tag
from rfs.script.package import resolve_reference

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.pipeline.model import Planned
    from rfs.run.store import Store
    from rfs.script.buildcontext import ContextEntry
    from rfs.script.model import BuildScript


def context_entries_of(script: BuildScript) -> list[ContextEntry]:
    """The build context's entries as the engine will see them (none without a Dockerfile);
    an unreadable directory in it is a script error naming `container.context`."""
    if script.container.dockerfile is None:
        return []
    from rfs.script.buildcontext import context_entries

    try:
        return context_entries(script)
    except OSError as exc:
        where = exc.filename or script.container.context
        raise ScriptError(
            [
                Problem(
                    "container.context",
                    f"cannot read {where} of the build context: {exc.strerror or exc}",
                    str(script.script_file),
                )
            ]
        ) from exc


def context_refs(entries: list[ContextEntry]) -> list[str]:
    """The package references of the context's files, to digest with the package's."""
    if not entries:
        return []
    from rfs.script.buildcontext import context_refs as refs_of

    return refs_of(entries)


def context_digests(entries: list[ContextEntry], digests: dict[str, str]) -> dict[str, str]:
    """Context entry name -> digest, for the key (empty without a Dockerfile)."""
    if not entries:
        return {}
    from rfs.script.buildcontext import context_digests as digests_of

    return digests_of(entries, digests)


def dockerfile_base(
    script: BuildScript,
    digests: dict[str, str],
    entries: list[ContextEntry],
    code: dict[str, str],
    store: Store,
    from_images: dict[str, dict[str, str]],
    *,
    fresh: bool = False,
) -> DockerfileBase | None:
    """A `container.dockerfile` base's key (what it is built from) and context, or None."""
    if script.container.dockerfile is None:
        return None
    facts = Facts(
        base_id="",
        file_digests=digests,
        engine=script.container.engine.value,
        code=code,
        context=context_digests(entries, digests),
        from_images=from_images,
    )
    key = dockerfile_tag_key(script, facts)
    store.hold({key})  # no eviction removes its image while this build runs
    tag = layer_tag(key, store.cache_id)
    return DockerfileBase(key, tuple(entries), tag, fresh, tuple(from_images))


def dockerfile_from_images(
    script: BuildScript, engine: Callable[[], Engine], *, quick: bool, pull: bool
) -> dict[str, dict[str, str]]:
    """The images a `container.dockerfile` base's stages refer to, resolved by the engine
    (empty without one). The Dockerfile is read as it is now; the build checks that its checked
    copy names the same images (`rfs.run.basefacts`)."""
    c = script.container
    if c.dockerfile is None:
        return {}
    from rfs.run.basefacts import from_image_facts

    assert script.package_root is not None
    text = resolve_reference(script.package_root, c.dockerfile).read_bytes()
    return from_image_facts(script, text, engine, quick=quick, pull=pull)


def record_dockerfile_base(store: Store, built: DockerfileBase, image_id: str, engine: str) -> None:
    """Record the image a Dockerfile base built (or found), like a layer: `rfs cache prune`
    and `clear` remove its tag with the entry."""
    record = store.record(built.key)
    if record is not None and record.get("image_id") == image_id:
        store.touch(built.key)
        return
    store.put_record(
        built.key,
        {
            "kind": "dockerfile",
            "tag": built.tag,
            "image_id": image_id,
            "inputs": {"engine": engine},
        },
    )


def rebuild_base(planned: Planned, built: DockerfileBase) -> None:
    """`--no-cache`: build the Dockerfile base again, every instruction, before the commands
    run on it. Its key stays (the inputs did not change); the tag and record move to the new
    image. (Planning resolved the base already, and built it if it was missing.)"""
    ex = planned.executor
    image_id = rebuild_dockerfile_base(ex.engine, planned.script, built, ex.snapshot)
    planned.facts = dataclasses.replace(planned.facts, base_id=image_id)
    engine = planned.script.container.engine.value
    record_dockerfile_base(planned.store, built, image_id, engine)
