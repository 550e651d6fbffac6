"""Installing one step from a decoded remote record (rfs.remote.record) into this machine.

Every object is downloaded into a new temporary file inside the cache directory (its name is
rfs's, never the server's) and checked (size, sha256, blake3) before it is decompressed or
used; nothing is reused by name, so a second reference to an object is checked like the first.
Only paths and tags rfs chooses are written: the step's blob in the store, the build's output,
and the layer tag of the step's key.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import EngineError, EnvironmentProblem
from rfs.graph.steps import Step, StepKind
from rfs.host.hashing import digest_file
from rfs.remote.codec import (
    BadObject,
    ObjectRef,
    decode_sparse,
    open_unpacked,
    unpack,
    verify_object,
)
from rfs.remote.layers import write_load_tarball
from rfs.remote.record import Record
from rfs.run.executors import output_identity

if TYPE_CHECKING:
    from rfs.remote.base import Backend
    from rfs.run.executors import Executor
    from rfs.run.store import Store


def download(backend: Backend, ref: ObjectRef, tmp: Path) -> Path:
    """Download `ref` into a new file in `tmp` and verify it; the file is the caller's."""
    fd, name = tempfile.mkstemp(prefix="object-", dir=tmp)
    os.close(fd)
    path = Path(name)
    try:
        backend.get_object(ref, path)
        verify_object(path, ref)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def install(
    store: Store,
    ex: Executor,
    step: Step,
    backend: Backend,
    record: Record,
    base: dict[str, Any],
    tmp: Path,
) -> int:
    """Install the step `record` describes; return the bytes downloaded. `base` holds the
    local record fields every fetched step gets."""
    if step.kind is StepKind.RUN:
        return _layer(store, ex, step, backend, record, base, tmp)
    if step.kind in (StepKind.EXPORT, StepKind.DIFF):
        return _export(store, step, backend, record, base, tmp)
    if step.kind is StepKind.ASSEMBLE:
        return _image(store, ex, step, backend, record, base, tmp)
    store.put_record(step.key, {**base, **record.fields})
    return 0


def _layer(
    store: Store,
    ex: Executor,
    step: Step,
    backend: Backend,
    record: Record,
    base: dict[str, Any],
    tmp: Path,
) -> int:
    paths: dict[ObjectRef, Path] = {}
    for ref in record.objects:
        if ref not in paths:
            paths[ref] = download(backend, ref, tmp)
    tarball = tmp / "image.tar"
    with tarball.open("wb") as f:
        write_load_tarball(record, paths, f)
    for path in paths.values():  # free the space before the engine copies the layers
        path.unlink()
    image_id = str(record.fields["image_id"])
    engine = ex.engine
    try:
        with tarball.open("rb") as f:
            engine.load_image(f)
    except EngineError as exc:
        # The config is the record's (e.g. one the engine finds invalid): a miss, not a
        # failed build. A dead engine fails the next step anyway, with its own message.
        raise BadObject(f"the engine refused the layer of {step.id}: {exc.message}") from exc
    # The image ID is the digest of the config the record carries, which lists the digest of
    # every layer, each checked while the tarball was written: an image with this ID in the
    # engine is exactly the image the record names.
    if _hex_id(engine.image_id(image_id)) != image_id[7:]:
        raise BadObject(f"the layer of {step.id} did not load as image {image_id[:19]}")
    tag = ex.layer_tag(step.key)
    engine.tag(image_id, tag)
    store.put_record(step.key, {**base, **record.fields, "image_id": image_id, "tag": tag})
    return sum(ref.size for ref in paths)


def _hex_id(image_id: str | None) -> str:
    """An image ID without its "sha256:" (Podman's API may leave it off)."""
    return (image_id or "").removeprefix("sha256:")


def _export(
    store: Store, step: Step, backend: Backend, record: Record, base: dict[str, Any], tmp: Path
) -> int:
    assert record.ref is not None
    path = download(backend, record.ref, tmp)
    size, digest = int(record.fields["blob_size"]), str(record.fields["blob_digest"])
    with store.write_blob(step.key) as writer:
        unpack(path, writer, limit=size)
        if writer.size != size or writer.digest != digest:
            raise BadObject(
                f"the export of {step.id} does not match its blake3 hash after decompression"
            )
    store.put_record(step.key, {**base, **record.fields})
    return record.ref.size


def _image(
    store: Store,
    ex: Executor,
    step: Step,
    backend: Backend,
    record: Record,
    base: dict[str, Any],
    tmp: Path,
) -> int:
    assert record.ref is not None
    path = download(backend, record.ref, tmp)
    out = ex.output
    part = out.parent / f".{out.name}.rfs-fetch-{os.getpid()}"
    try:
        with open_unpacked(path) as reader:
            decode_sparse(reader, part, record.image_size)
        if part.stat().st_size != record.image_size or digest_file(part) != record.image_blake3:
            raise BadObject(f"the image of {step.id} does not match its blake3 hash")
        os.replace(part, out)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    old = store.record(step.key) or {}
    outputs = dict(old.get("outputs", {}))
    outputs[str(out.resolve())] = output_identity(out)
    store.put_record(step.key, {**base, "outputs": outputs})
    return record.ref.size
