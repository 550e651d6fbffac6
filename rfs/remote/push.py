"""Uploading one step this build made: its objects first, then its record (signed, if a key
is set), so a record never names an object the server lacks."""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rfs.graph.steps import Step, StepKind
from rfs.host.hashing import digest_file
from rfs.remote.base import Backend
from rfs.remote.codec import (
    CHUNK,
    BadObject,
    ObjectRef,
    RawDigest,
    copy_stream,
    encode_sparse,
    packing,
)
from rfs.remote.layers import describe_layer
from rfs.remote.record import Wanted, b64, encode_record
from rfs.remote.signing import SecretKey
from rfs.run.executors import output_identity

if TYPE_CHECKING:
    from rfs.run.executors import Executor
    from rfs.run.store import Store

_MEMO = "remote-objects"  # raw blake3 of a layer tarball -> its object, to skip recompressing


class Pusher:
    """Writes steps to one remote cache."""

    def __init__(
        self, writer: Backend, store: Store, ex: Executor, sign_key: SecretKey | None
    ) -> None:
        self.writer = writer
        self.store = store
        self.ex = ex
        self.sign_key = sign_key
        self.sent_bytes = 0

    def push(self, step: Step, record: dict[str, Any], wanted: Wanted, tmp: Path) -> None:
        """Upload `step` (its local `record`) as the remote record `wanted`."""
        body: dict[str, Any] = {}
        if step.kind is StepKind.RUN:
            tarball = tmp / "image.tar"
            with tarball.open("wb") as f:
                self.ex.engine.save_image(self.ex.layer_tag(step.key), f)
            image_id = str(record["image_id"])
            body["layer"] = describe_layer(
                tarball, image_id, lambda data, size: self._put_member(data, tmp)
            )
            fields: dict[str, Any] = {
                "image_id": image_id,
                "new_layer": bool(record.get("new_layer", True)),
            }
        elif step.kind in (StepKind.EXPORT, StepKind.DIFF):
            blob = self.store.blob(step.key)
            if blob is None or not self.store.verify_blob(blob):
                raise BadObject("its export tarball is missing or corrupt in the cache")
            with packing(tmp) as (sink, finish), blob.path.open("rb") as f:
                copy_stream(f, sink)
                path, ref = finish()
                self._put(path, ref)
            body[step.kind.value] = {"object": ref.to_json()}
            fields = {k: record[k] for k in ("blob_size", "blob_digest")}
            if step.kind is StepKind.DIFF:
                fields["anchor"] = bool(record["anchor"])
                fields["chain"] = dict(record["chain"])
        elif step.kind is StepKind.ASSEMBLE:
            out = self.ex.output
            recorded = record.get("outputs", {}).get(str(out.resolve()))
            if recorded is None or recorded != output_identity(out):
                raise BadObject(f"{out} changed since it was built")
            with packing(tmp) as (sink, finish):
                encode_sparse(out, sink)
                path, ref = finish()
                self._put(path, ref)
            body["image"] = {
                "object": ref.to_json(),
                "size": out.stat().st_size,
                "blake3": digest_file(out),
            }
            fields = {}
        else:
            fields = {"overlays": int(record.get("overlays", 0))}
        if step.kind in (StepKind.RUN, StepKind.EXPORT, StepKind.DIFF):
            fields["etc_written"] = {
                path: b64(bytes(data)) for path, data in dict(record.get("etc_written", {})).items()
            }
        # When it was made, so a reader applies the commands' max_age as the writer would.
        if isinstance(record.get("created"), int | float):
            fields["created"] = float(record["created"])
        if isinstance(record.get("made_at"), dict):
            fields["made_at"] = {str(k): float(v) for k, v in record["made_at"].items()}
        body["fields"] = fields
        self.writer.put_record(
            wanted.name, encode_record(body, wanted, self.sign_key), _objects(body)
        )

    def _put(self, path: Path, ref: ObjectRef) -> None:
        if not self.writer.has_object(ref):
            self.writer.put_object(ref, path)
            self.sent_bytes += ref.size

    def _put_member(self, data: IO[bytes], tmp: Path) -> ObjectRef:
        """Upload one layer tarball as an object; layers seen before are not recompressed."""
        raw = RawDigest(_Null())
        start = data.tell()
        copy_stream(data, raw)
        memo = self.store.meta(_MEMO)
        known = memo.get(raw.hash.hexdigest())
        if known is not None:
            try:
                ref = ObjectRef.from_json(known)
            except BadObject:
                ref = None
            if ref is not None and self.writer.has_object(ref):
                return ref
        data.seek(start)
        with packing(tmp) as (sink, finish):
            for chunk in iter(lambda: data.read(CHUNK), b""):
                sink.write(chunk)
            path, ref = finish()
            self._put(path, ref)
        memo[raw.hash.hexdigest()] = ref.to_json()
        self.store.set_meta(_MEMO, memo)
        return ref


def _objects(body: dict[str, Any]) -> list[ObjectRef]:
    """The objects a record body names (an OCI manifest lists them as its layers)."""
    refs: list[ObjectRef] = []
    for part in ("export", "image"):
        if part in body:
            refs.append(ObjectRef.from_json(body[part]["object"]))
    for layer in body.get("layer", {}).get("layers", []):
        if "object" in layer:
            refs.append(ObjectRef.from_json(layer["object"]))
    return refs


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)
