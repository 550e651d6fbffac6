"""A build's use of remote caches: lazy lookups, verified downloads, uploads of what it made.

1. Planning asks `availability` about a step only when the local cache lacks it and a later
   step needs it (the planner walks back from the image), so a hit on the image looks up one
   record and a miss at command 3 stops at the deepest layer some cache holds.
2. `materialize` downloads exactly the steps the plan marked cached but the local cache lacks:
   the image file, an export tarball, or one layer (`docker load`ed into the engine). Every
   object is checked against its size, sha256 and blake3 before use; a bad or missing one is a
   miss with a warning, and the build is planned again without it.
3. `upload` sends what this build made (and what the target has not seen) after the steps:
   objects first, the record last, so a record never names an object that is not there.
   Only recorded steps are uploaded, and a step is recorded only once it succeeded.

A server that cannot be reached, times out or answers with errors is a warning and is not used
again in this build; with `strict` it is an error (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rfs.errors import EnvironmentProblem, RemoteCacheError
from rfs.executors import output_identity
from rfs.hashing import digest_file
from rfs.planner import Action, Availability, Decision, plan_steps
from rfs.remote import open_backend
from rfs.remote.base import Backend, record_names, scoped_name
from rfs.remote.codec import (
    CHUNK,
    BadObject,
    ObjectRef,
    RawDigest,
    copy_stream,
    decode_sparse,
    encode_sparse,
    from_jsonable,
    join_tarball,
    jsonable,
    open_unpacked,
    packing,
    split_tarball,
    unpack,
    verify_object,
)
from rfs.remote.config import RemoteSettings
from rfs.steps import Step, StepKind

if TYPE_CHECKING:
    from rfs.build import Planned
    from rfs.executors import Executor
    from rfs.reporter import Reporter
    from rfs.store import Store

FORMAT = "rfs-remote-1"
_MEMO = "remote-objects"  # raw blake3 of a tarball member -> its object, to skip recompressing


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class RemoteCache:
    """The remote caches one build reads and writes."""

    def __init__(self, settings: RemoteSettings, store: Store, executor: Executor,
                 reporter: Reporter) -> None:
        self.settings = settings
        self.store = store
        self.ex = executor
        self.reporter = reporter
        self.readers: list[Backend] = [open_backend(u, settings) for u in settings.read_urls()]
        self.writer: Backend | None = None
        if settings.target:
            index = settings.read_urls().index(settings.target)
            self.writer = self.readers[index]
        self.down: set[str] = set()  # servers that failed: not asked again in this build
        self.found: dict[str, tuple[Backend, dict[str, Any]]] = {}
        self.bad: set[str] = set()  # step keys whose remote copy failed to download
        self._looked: set[str] = set()
        self.fetched: list[str] = []  # step ids downloaded, in order
        self.sent_bytes = 0

    def close(self) -> None:
        """Close every backend's connections."""
        for backend in self.readers:
            backend.close()

    # -- faults ----------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        self.reporter.message(f"rfs: warning: {text}")

    def _server_failed(self, backend: Backend, exc: RemoteCacheError) -> None:
        """A server fault: an error with --cache-strict, else a warning and no more requests."""
        if self.settings.strict:
            raise RemoteCacheError(
                exc.message, hint="the remote cache is required (--cache-strict); check the "
                                  "server, or drop --cache-strict to build without it") from exc
        if backend.url not in self.down:
            self.down.add(backend.url)
            self._warn(f"{exc.message}; continuing without this cache")

    # -- planning --------------------------------------------------------------------------

    def availability(self, local: Availability) -> Availability:
        """`local`, extended: a step missing locally is available if a remote has it."""

        def available(step: Step) -> str | None:
            why = local(step)
            if why is None or step.kind is StepKind.BASE or step.key in self.bad:
                return why
            return None if self.lookup(step) is not None else why

        return available

    def lookup(self, step: Step) -> tuple[Backend, dict[str, Any]] | None:
        """The first remote record of `step` (scope first, then the default scope), if any."""
        if step.key in self._looked:
            return self.found.get(step.key)
        self._looked.add(step.key)
        for backend in self.readers:
            if backend.url in self.down:
                continue
            for name in record_names(step.key, self.settings.scope):
                try:
                    data = backend.get_record(name)
                    if data is None:
                        continue
                    doc = self._parse(data, step, backend)
                except BadObject as exc:
                    self._warn(f"{exc.message}; ignoring it")
                    continue
                except RemoteCacheError as exc:
                    self._server_failed(backend, exc)
                    break
                self.found[step.key] = (backend, doc)
                return backend, doc
        return None

    def _parse(self, data: bytes, step: Step, backend: Backend) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise BadObject(f"remote cache {backend.url}: the record of {step.id} is not "
                            "JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BadObject(f"remote cache {backend.url}: the record of {step.id} has an "
                            "unknown format")
        if doc.get("key") != step.key or doc.get("kind") != step.kind.value:
            raise BadObject(f"remote cache {backend.url}: the record of {step.id} is for "
                            "another step")
        return doc

    # -- downloading -----------------------------------------------------------------------

    def materialize(self, planned: Planned) -> list[Decision]:
        """Download what the plan takes from remote caches; return the final plan.

        A failed download removes that remote copy and plans again, so a bad image object
        falls back to the export, a bad export to the layer, and so on. Bounded: each round
        either succeeds or removes at least one remote copy.
        """
        decisions = planned.decisions
        for _ in range(len(planned.steps) + 1):
            todo = [d.step for d in decisions
                    if d.action is Action.CACHED and d.step.key in self.found
                    and self.ex.missing(d.step) is not None]
            failed = False
            for step in todo:
                backend, doc = self.found[step.key]
                if backend.url in self.down:
                    failed = True
                    self.bad.add(step.key)
                    continue
                try:
                    self._fetch_locked(step, backend, doc)
                except BadObject as exc:
                    self._warn(f"{exc.message}; {step.id} will be rebuilt")
                    self.bad.add(step.key)
                    failed = True
                except RemoteCacheError as exc:
                    self._server_failed(backend, exc)
                    self.bad.add(step.key)
                    failed = True
            if not failed:
                return decisions
            decisions = plan_steps(planned.steps, self.availability(self.ex.missing),
                                   planned.previous, planned.forced)
        return decisions

    def _fetch_locked(self, step: Step, backend: Backend, doc: dict[str, Any]) -> None:
        def waiting() -> None:
            self.reporter.message(f"  waiting  {step.id:<10} another rfs process is "
                                  "fetching or building it")

        with self.store.building(step.key, on_wait=waiting):
            if self.ex.missing(step) is None:
                return  # another process fetched or built it meanwhile
            t0 = time.monotonic()
            nbytes = self._fetch(step, backend, doc)
            self.fetched.append(step.id)
            self.reporter.message(f"  fetched  {step.id:<10} from {backend.url} "
                                  f"({_size(nbytes)} in {time.monotonic() - t0:.2f} s)")

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="remote-", dir=self.store.root / "tmp") as tmp:
            yield Path(tmp)

    def _download(self, backend: Backend, ref: ObjectRef, tmp: Path) -> Path:
        path = tmp / ref.sha256
        if not path.exists():
            backend.get_object(ref, path)
            verify_object(path, ref)
        return path

    def _fetch(self, step: Step, backend: Backend, doc: dict[str, Any]) -> int:
        """Download and install one step; return the bytes downloaded."""
        try:
            rec = from_jsonable(doc.get("record", {}))
            base: dict[str, Any] = {"kind": step.kind.value, "step": step.id,
                                    "inputs": dict(step.inputs), "fetched_from": backend.url}
            if self.writer is not None and backend.url == self.writer.url:
                base["pushed"] = [backend.url]  # it is there already: no need to send it back
            with self._scratch() as tmp:
                if step.kind is StepKind.RUN:
                    return self._fetch_layer(step, backend, doc, rec, base, tmp)
                if step.kind is StepKind.EXPORT:
                    return self._fetch_export(step, backend, doc, rec, base, tmp)
                if step.kind is StepKind.ASSEMBLE:
                    return self._fetch_image(step, backend, doc, base, tmp)
                self.store.put_record(step.key, {**base, "overlays": int(rec["overlays"])})
                return 0
        except (KeyError, TypeError, ValueError) as exc:
            raise BadObject(f"remote cache {backend.url}: the record of {step.id} is "
                            f"malformed ({type(exc).__name__}: {exc})") from exc

    def _fetch_layer(self, step: Step, backend: Backend, doc: dict[str, Any],
                     rec: dict[str, Any], base: dict[str, Any], tmp: Path) -> int:
        members = doc["layer"]["members"]
        paths: dict[str, Path] = {}
        total = 0
        for entry in members:
            if "object" in entry:
                ref = ObjectRef.from_json(entry["object"])
                if ref.sha256 not in paths:
                    paths[ref.sha256] = self._download(backend, ref, tmp)
                    total += ref.size
        tarball = tmp / "image.tar"
        with tarball.open("wb") as f:
            join_tarball(members, paths, f)
        for path in paths.values():  # free the space before the engine copies the layers
            path.unlink()
        engine = self.ex.engine
        with tarball.open("rb") as f:
            engine.load_image(f)
        image_id = str(rec["image_id"])
        # The engine checks every layer against the image config, whose digest is the ID: an
        # image with this ID is the image that was uploaded.
        if engine.image_id(image_id) != image_id:
            raise BadObject(f"the layer of {step.id} did not load as image {image_id[:19]}")
        engine.tag(image_id, self.ex.layer_tag(step.key))
        self.store.put_record(step.key, {**base, "image_id": image_id,
                                         "tag": self.ex.layer_tag(step.key),
                                         "etc_written": dict(rec.get("etc_written", {}))})
        return total

    def _fetch_export(self, step: Step, backend: Backend, doc: dict[str, Any],
                      rec: dict[str, Any], base: dict[str, Any], tmp: Path) -> int:
        ref = ObjectRef.from_json(doc["export"]["object"])
        path = self._download(backend, ref, tmp)
        size, digest = int(rec["blob_size"]), str(rec["blob_digest"])
        with self.store.write_blob(step.key) as writer:
            unpack(path, writer)
            if writer.size != size or writer.digest != digest:
                raise BadObject(f"the export of {step.id} does not match its blake3 hash "
                                "after decompression")
        self.store.put_record(step.key, {**base, "blob_size": size, "blob_digest": digest,
                                         "etc_written": dict(rec.get("etc_written", {}))})
        return ref.size

    def _fetch_image(self, step: Step, backend: Backend, doc: dict[str, Any],
                     base: dict[str, Any], tmp: Path) -> int:
        image = doc["image"]
        ref = ObjectRef.from_json(image["object"])
        path = self._download(backend, ref, tmp)
        out = self.ex.output
        part = out.parent / f".{out.name}.rfs-fetch-{os.getpid()}"
        try:
            with open_unpacked(path) as reader:
                decode_sparse(reader, part)
            if part.stat().st_size != int(image["size"]) or digest_file(part) != image["blake3"]:
                raise BadObject(f"the image of {step.id} does not match its blake3 hash")
            os.replace(part, out)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot write {out}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        old = self.store.record(step.key) or {}
        outputs = dict(old.get("outputs", {}))
        outputs[str(out.resolve())] = output_identity(out)
        self.store.put_record(step.key, {**base, "outputs": outputs})
        return ref.size

    # -- uploading -------------------------------------------------------------------------

    def upload(self, planned: Planned, ran: set[str]) -> None:
        """Send the steps this build ran, and the cached ones the target lacks."""
        writer = self.writer
        if writer is None or writer.url in self.down:
            return
        actions = {d.step.key: d.action for d in planned.decisions}
        t0 = time.monotonic()
        pushed = 0
        sent_before = self.sent_bytes
        for step in planned.steps:
            record = self.store.record(step.key)
            if step.kind is StepKind.BASE or record is None:
                continue  # failed steps have no record: they are never uploaded
            if writer.url in record.get("pushed", []):
                continue
            if step.key not in ran and actions.get(step.key) is not Action.CACHED:
                continue
            try:
                name = scoped_name(step.key, self.settings.scope)
                if step.key in ran or writer.get_record(name) is None:
                    self._push(writer, step, record, name)
                    pushed += 1
                self._mark_pushed(step.key, writer.url)
            except BadObject as exc:
                self._warn(f"not uploading {step.id}: {exc.message}")
            except RemoteCacheError as exc:
                self._server_failed(writer, exc)
                return
        if pushed:
            self.reporter.message(
                f"  pushed   {pushed} step(s) to {writer.url} "
                f"({_size(self.sent_bytes - sent_before)} sent in "
                f"{time.monotonic() - t0:.2f} s)")

    def _mark_pushed(self, key: str, url: str) -> None:
        record = self.store.record(key)
        if record is not None:
            record["pushed"] = sorted({*record.get("pushed", []), url})
            self.store.put_record(key, record)

    def _put(self, writer: Backend, path: Path, ref: ObjectRef) -> None:
        if not writer.has_object(ref):
            writer.put_object(ref, path)
            self.sent_bytes += ref.size

    def _push(self, writer: Backend, step: Step, record: dict[str, Any], name: str) -> None:
        doc: dict[str, Any] = {"format": FORMAT, "key": step.key, "kind": step.kind.value,
                               "step": step.id}
        objects: list[ObjectRef] = []
        with self._scratch() as tmp:
            if step.kind is StepKind.RUN:
                tarball = tmp / "image.tar"
                with tarball.open("wb") as f:
                    self.ex.engine.save_image(self.ex.layer_tag(step.key), f)
                doc["layer"] = {"members": split_tarball(
                    tarball, lambda data, size: self._put_member(writer, data, tmp, objects))}
                keep = {"image_id": record["image_id"],
                        "etc_written": record.get("etc_written", {})}
            elif step.kind is StepKind.EXPORT:
                blob = self.store.blob(step.key)
                if blob is None or not self.store.verify_blob(blob):
                    raise BadObject("its export tarball is missing or corrupt in the cache")
                with packing(tmp) as (sink, finish), blob.path.open("rb") as f:
                    copy_stream(f, sink)
                    path, ref = finish()
                    self._put(writer, path, ref)
                objects.append(ref)
                doc["export"] = {"object": ref.to_json()}
                keep = {k: record[k] for k in ("blob_size", "blob_digest")}
                keep["etc_written"] = record.get("etc_written", {})
            elif step.kind is StepKind.ASSEMBLE:
                out = self.ex.output
                recorded = record.get("outputs", {}).get(str(out.resolve()))
                if recorded is None or recorded != output_identity(out):
                    raise BadObject(f"{out} changed since it was built")
                with packing(tmp) as (sink, finish):
                    encode_sparse(out, sink)
                    path, ref = finish()
                    self._put(writer, path, ref)
                objects.append(ref)
                doc["image"] = {"object": ref.to_json(), "size": out.stat().st_size,
                                "blake3": digest_file(out)}
                keep = {}
            else:
                keep = {"overlays": record.get("overlays", 0)}
            doc["record"] = jsonable(keep)
            writer.put_record(name, json.dumps(doc, sort_keys=True).encode(), objects)

    def _put_member(self, writer: Backend, data: IO[bytes], tmp: Path,
                    objects: list[ObjectRef]) -> ObjectRef:
        """Upload one tarball member as an object; members seen before are not recompressed."""
        raw = RawDigest(_Null())
        start = data.tell()
        copy_stream(data, raw)
        memo = self.store.meta(_MEMO)
        known = memo.get(raw.hash.hexdigest())
        if known is not None:
            ref = ObjectRef.from_json(known)
            if writer.has_object(ref):
                objects.append(ref)
                return ref
        data.seek(start)
        with packing(tmp) as (sink, finish):
            for chunk in iter(lambda: data.read(CHUNK), b""):
                sink.write(chunk)
            path, ref = finish()
            self._put(writer, path, ref)
        memo[raw.hash.hexdigest()] = ref.to_json()
        self.store.set_meta(_MEMO, memo)
        objects.append(ref)
        return ref


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)
