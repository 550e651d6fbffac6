"""The layered export of ext4 builds (#16): what each command changed, kept per command, so a
late edit never exports the whole container again.

Each RUN step of such a build is followed by a DIFF step (`diff[i]`, rfs.graph.compiler) whose
blob is either what the command changed (its top layer, normalised: rfs.engine.layerdiff) or,
when that would make the chain too big or cannot be laid on exactly (rfs.fs.layered), the full
export of the command's layer image: an *anchor*. Its record says which:

    "anchor": bool           the blob is a full export (True) or a layer diff (False)
    "chain": {"anchor": KEY or "base", "diffs": [KEY, ...], "data": N, "entries": N}
                             what the container's tree is made of after this command: the
                             anchor (a DIFF step's key, or the base image's export) and the
                             DIFF steps since, with the bytes and entries their diffs hold
    "etc_written"            the command's writes to the engine-managed /etc files

Whether a step is an anchor depends only on what the commands changed (sizes, entries,
hard links touched), never on the cache's history, so a warm build and a clean build make the
same chain and the same image. The base image's export, needed only when no command is an
anchor, is a local store entry of kind "base-export" (the base image is always at hand).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rfs.errors import EngineError, RfsError
from rfs.graph.steps import Step, StepKind

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.engine.layerdiff import Limit
    from rfs.report.reporter import Reporter
    from rfs.run.store import Blob, Store


class Executor(Protocol):
    """What this module needs of rfs.run.executors.Executor (which imports this module)."""

    store: Store
    reporter: Reporter

    @property
    def engine(self) -> Engine: ...

    def verified(self, key: str, blob: Blob) -> bool: ...

    def export_image(self, image: str, key: str, step: Step) -> tuple[int, str]: ...

    def adopt_early_export(self, run_key: str, key: str) -> tuple[int, str] | None: ...

    def layer_tag(self, key: str) -> str: ...


# How much the diffs since the last anchor may hold: every image is the anchor's base image
# patched with all of them, so this bounds what an edit costs on top of its own change.
CHAIN_DATA_BYTES = 32 << 20
CHAIN_ENTRIES = 4000
BASE = "base"


def chain_limit() -> Limit:
    """What a chain may hold: a command whose change alone holds more is an anchor."""
    from rfs.engine.layerdiff import Limit

    return Limit(data_bytes=CHAIN_DATA_BYTES, entries=CHAIN_ENTRIES)


def empty_chain() -> dict[str, Any]:
    """The chain of the base image: its export, no diffs."""
    return {"anchor": BASE, "diffs": [], "data": 0, "entries": 0}


def chain_of(executor: Executor, step: Step) -> dict[str, Any]:
    """The chain after `step` (a DIFF step, or the base)."""
    if step.kind is StepKind.BASE:
        return empty_chain()
    record = executor.store.record(step.key) or {}
    chain = record.get("chain")
    if not isinstance(chain, dict):
        raise RfsError(f"the cache record of {step.id} has no chain: run `rfs cache clear`")
    return chain


def base_export_key(base_id: str, diff: Step) -> str:
    """The store key of the export of base image `base_id` (an image ID names its content) by
    the engine (and its version: exports differ between versions) that DIFF step `diff`'s
    key names."""
    from rfs.graph.codeversion import code_version
    from rfs.host.hashing import digest_json

    return digest_json(
        {
            "kind": "base-export",
            "image": base_id,
            "engine": diff.inputs.get("engine", ""),
            "engine_version": diff.inputs.get("engine_version", ""),
            "code": code_version("export"),
        }
    )


def base_export(executor: Executor, base_id: str, diff: Step, step: Step) -> Path:
    """The export of the base image by the engine of DIFF step `diff`, made (and kept as a
    local entry) if missing; progress shows on `step`."""
    key = base_export_key(base_id, diff)
    executor.store.hold({key})
    # Two builds must not both export it: two exports differ in their bytes (the times of
    # the engine's mount points), and one's record would describe the other's file.
    with executor.store.building(key):
        blob = executor.store.blob(key)
        if blob is not None and executor.verified(key, blob):
            executor.store.touch(key)
            return blob.path
        size, digest = executor.export_image(base_id, key, step)
        executor.store.put_record(
            key, {"kind": "base-export", "blob_size": size, "blob_digest": digest}
        )
    return executor.store.root / "blobs" / key


def anchor_path(
    executor: Executor, chain: dict[str, Any], base_id: str, diff: Step, step: Step
) -> Path:
    """The export the chain of DIFF step `diff` starts from (checked against its recorded
    digest); progress shows on `step`."""
    anchor = chain["anchor"]
    if anchor == BASE:
        return base_export(executor, base_id, diff, step)
    return blob_path(executor, str(anchor), "the export of a layered build")


def blob_path(executor: Executor, key: str, what: str) -> Path:
    """The verified blob of DIFF step `key`."""
    blob = executor.store.blob(key)
    if blob is None or not executor.verified(key, blob):
        if blob is not None:
            executor.store.drop(key)
        raise RfsError(
            f"{what} ({key[:12]}…) vanished from the cache or was damaged during the build; "
            "the next build makes it again"
        )
    executor.store.touch(key)
    return blob.path


@dataclass(frozen=True)
class MadeOf:
    """What an ASSEMBLE step makes the image of: an export (by its store key) and the layer
    diffs laid on it, and the /etc writes to put back."""

    key: str
    blob: Blob
    layers: tuple[Path, ...]
    restore: dict[str, bytes]


def assembly_source(
    executor: Executor, step: Step, parents: dict[str, Step], base_id: str
) -> MadeOf:
    """The export and layer diffs ASSEMBLE step `step` reads, checked intact."""
    diffs = [parents[p] for p in step.parents if parents[p].kind is StepKind.DIFF]
    if diffs:
        last = max(diffs, key=lambda d: d.index or 0)
        record = executor.store.record(last.key) or {}
        chain = chain_of(executor, last)
        anchor = anchor_path(executor, chain, base_id, last, step)
        key = base_export_key(base_id, last) if chain["anchor"] == BASE else str(chain["anchor"])
        blob = executor.store.blob(key)
        assert blob is not None  # anchor_path checked it
        layers = tuple(blob_path(executor, d, "a layer diff") for d in chain["diffs"])
        del anchor
        return MadeOf(key, blob, layers, dict(record.get("etc_written", {})))
    export = next(parents[p] for p in step.parents if parents[p].kind is StepKind.EXPORT)
    found = executor.store.blob(export.key)
    if found is None:
        raise RfsError("the export tarball vanished from the cache during the build")
    if not executor.verified(export.key, found):
        # Checked when planning, so it went bad during this build: too late to export
        # again here, but the next build will.
        executor.store.drop(export.key)
        raise RfsError(
            "the cached export tarball was damaged during the build; it was "
            "removed, and the next build exports it again"
        )
    restore = dict((executor.store.record(export.key) or {}).get("etc_written", {}))
    return MadeOf(export.key, found, (), restore)


def run_diff(
    executor: Executor, step: Step, parents: dict[str, Step], base_id: str
) -> dict[str, Any]:
    """Make DIFF step `step`: the command's change if the chain stays small and exact, else
    the full export of its layer image (an anchor)."""
    from rfs.engine.layerdiff import Limit

    run_step = parents[step.parents[0]]
    before = chain_of(executor, parents[step.parents[1]])
    run_record = executor.store.record(run_step.key) or {}
    image = executor.layer_tag(run_step.key)
    written = dict(run_record.get("etc_written", {}))
    room = Limit(
        data_bytes=CHAIN_DATA_BYTES - int(before["data"]),
        entries=CHAIN_ENTRIES - int(before["entries"]),
    )
    diff = _try_diff(executor, step, image, room, bool(run_record.get("new_layer", True)))
    if diff is not None:
        size, digest, data, entries = diff
        problem = _unlayerable(executor, before, step, base_id)
        if problem is None:
            chain = {
                "anchor": before["anchor"],
                "diffs": [*before["diffs"], step.key],
                "data": int(before["data"]) + data,
                "entries": int(before["entries"]) + entries,
            }
            return _record(False, size, digest, chain, written)
        executor.reporter.message(f"rfs: {step.id}: exporting the whole container: {problem}")
        executor.store.drop(step.key)
    # Exported while the command's commit ran (rfs.run.earlyexport), else now.
    early = executor.adopt_early_export(run_step.key, step.key)
    size, digest = early or executor.export_image(image, step.key, step)
    chain = {"anchor": step.key, "diffs": [], "data": 0, "entries": 0}
    return _record(True, size, digest, chain, written)


def _record(
    anchor: bool, size: int, digest: str, chain: dict[str, Any], written: dict[str, bytes]
) -> dict[str, Any]:
    return {
        "anchor": anchor,
        "blob_size": size,
        "blob_digest": digest,
        "chain": chain,
        "etc_written": written,
    }


def _try_diff(
    executor: Executor, step: Step, image: str, room: Limit, new_layer: bool
) -> tuple[int, str, int, int] | None:
    """Write the command's change as the blob of `step`; None when it does not fit `room`.
    Returns the blob's size and digest, and the change's data bytes and entries."""
    from rfs.fs import tarformat as tf
    from rfs.host.hashing import digest_file

    if room.data_bytes < 0 or room.entries <= 0:
        return None
    try:
        with executor.store.blob_file(step.key) as tmp:
            with tmp.open("w+b") as out:
                if not executor.engine.layer_diff(image, out, room, new_layer=new_layer):
                    raise _TooLarge
            entries = tf.index_archive(tmp.read_bytes())  # small: at most the room left
            digest = digest_file(tmp)
            size = tmp.stat().st_size
    except _TooLarge:
        return None
    except tf.TarError as exc:
        raise EngineError(f"the layer diff of {image} is damaged: {exc}") from exc
    executor.store.remember_verified(step.key, digest)
    data = sum(e.size for e in entries if e.is_regular)
    return size, digest, data, len(entries)


class _TooLarge(Exception):
    """The change does not fit the room the chain has left."""


def _unlayerable(
    executor: Executor, before: dict[str, Any], step: Step, base_id: str
) -> str | None:
    """Why the chain's diffs plus the new one (the blob of `step`) cannot be laid on the
    anchor exactly, or None."""
    from rfs.fs import tarformat as tf
    from rfs.fs.ext4patch import export_entries
    from rfs.fs.layered import Unlayerable, apply_layers

    key = step.key
    anchor = anchor_path(executor, before, base_id, step, step)
    anchor_key = (
        base_export_key(base_id, step) if before["anchor"] == BASE else str(before["anchor"])
    )
    # Checked against the blob's digest: a step run again writes other bytes under its key.
    digest = (executor.store.record(anchor_key) or {}).get("blob_digest")
    try:
        layers = []
        for diff in [*before["diffs"], key]:
            path = (
                executor.store.root / "blobs" / key
                if diff == key
                else blob_path(executor, diff, "a layer diff")
            )
            layers.append(tf.index_archive(path.read_bytes()))
        side = executor.store.side_dir(anchor_key)
        apply_layers(
            export_entries(anchor, side, digest if isinstance(digest, str) else None), layers
        )
    except Unlayerable as exc:
        return str(exc)
    except (OSError, ValueError, tf.TarError) as exc:
        raise EngineError(f"cannot read a layer diff: {exc}") from exc
    return None
