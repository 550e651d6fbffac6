"""A build's use of remote caches: lazy lookups, verified downloads, uploads of what it made.

1. Planning asks `availability` about a step only when the local cache lacks it and a later
   step needs it (the planner walks back from the image), so a hit on the image looks up one
   record and a miss at command 3 stops at the deepest layer some cache holds.
2. `materialize` downloads exactly the steps the plan marked cached but the local cache lacks:
   the image file, an export tarball, or one layer (`docker load`ed into the engine). Every
   record is decoded and checked (rfs.remote.record), every object verified before use
   (rfs.remote.fetch); a bad one is a miss, and the build is planned again without it.
3. `upload` sends what this build made (and what the target has not seen) after the steps:
   objects first, the record last (rfs.remote.push), so a record never names an object that is
   not there. Only recorded steps are uploaded, and a step is recorded only once it succeeded.

A server that cannot be reached, times out or answers with errors is a warning and is not used
again in this build; with `strict` it is an error (exit 3). Records and objects that are
malformed, wrong or not signed by a trusted key are misses, summed up in one warning per server
once the plan is final: a hostile server costs misses, never a wrong image.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import RemoteCacheError
from rfs.graph.planner import Availability
from rfs.graph.steps import Step, StepKind
from rfs.remote import open_backend
from rfs.remote.base import Backend, record_names, scoped_name
from rfs.remote.codec import BadObject
from rfs.remote.config import RemoteSettings
from rfs.remote.fetch import install
from rfs.remote.push import Pusher
from rfs.remote.record import Record, Untrusted, Wanted, decode_record

if TYPE_CHECKING:
    from rfs.report.reporter import Reporter
    from rfs.run.executors import Executor
    from rfs.run.store import Store

_SHOWN = 3  # reasons named in a server's warning; the rest are counted


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class RemoteCache:
    """The remote caches one build reads and writes."""

    def __init__(
        self, settings: RemoteSettings, store: Store, executor: Executor, reporter: Reporter
    ) -> None:
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
        self.found: dict[str, tuple[Backend, Record]] = {}
        self.bad: set[str] = set()  # step keys whose remote copy failed to download
        self._looked: set[str] = set()
        self.fetched: list[str] = []  # step ids downloaded, in order
        self.sent_bytes = 0
        # server URL -> (why one of its copies was a miss, whether for its signature)
        self.ignored: dict[str, list[tuple[str, bool]]] = {}
        # Why a record's result is stale (a command's max_age), or None: a stale remote copy
        # is a miss, as a stale local one makes its step run (set by the build).
        self.stale: Callable[[Step, Mapping[str, Any]], str | None] | None = None

    def close(self) -> None:
        """Report what was ignored (if not yet), and close every backend's connections."""
        self.report_ignored()
        for backend in self.readers:
            backend.close()

    # -- faults ----------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        self.reporter.message(f"rfs: warning: {text}")

    def _server_failed(self, backend: Backend, exc: RemoteCacheError) -> None:
        """A server fault: an error with --cache-strict, else a warning and no more requests."""
        if self.settings.strict:
            raise RemoteCacheError(
                exc.message,
                hint="the remote cache is required (--cache-strict); check the "
                "server, or drop --cache-strict to build without it",
            ) from exc
        if backend.url not in self.down:
            self.down.add(backend.url)
            self._warn(f"{exc.message}; continuing without this cache")

    def _ignore(self, backend: Backend, exc: BadObject, step: Step, fetching: bool) -> None:
        """A record or object of `backend` is a miss: remember why, for one warning later."""
        text = exc.message.removeprefix(f"remote cache {backend.url}: ")
        if fetching:
            text += f" ({step.id} will be rebuilt)"
        self.ignored.setdefault(backend.url, []).append((text, isinstance(exc, Untrusted)))

    def report_ignored(self) -> None:
        """One warning per server whose records or objects were misses, then forget them."""
        for url, reasons in self.ignored.items():
            untrusted = sum(1 for _, unsigned in reasons if unsigned)
            shown = list(dict.fromkeys(text for text, _ in reasons))
            more = f" (and {len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
            count = f"{len(reasons)} record(s) or object(s)"
            if untrusted:
                count += f", {untrusted} of them not signed by a trusted key"
            self._warn(
                f"remote cache {url}: ignored {count}, built locally instead: "
                f"{'; '.join(shown[:_SHOWN])}{more}"
            )
        self.ignored.clear()

    # -- planning --------------------------------------------------------------------------

    def availability(self, local: Availability) -> Availability:
        """`local`, extended: a step missing locally is available if a remote has it."""

        def available(step: Step) -> str | None:
            why = local(step)
            if why is None or step.kind is StepKind.BASE or step.key in self.bad:
                return why
            if step.kind is StepKind.ASSEMBLE and self.ex.script.outputs:
                return why  # side outputs are made from the export here, with the image
            found = self.lookup(step)
            if found is None:
                return why
            stale = self.stale(step, found[1].fields) if self.stale is not None else None
            return None if stale is None else f"{stale} (the remote copy)"

        return available

    def lookup(self, step: Step) -> tuple[Backend, Record] | None:
        """The first usable remote record of `step` (scope first, then the default scope)."""
        if step.key in self._looked:
            return self.found.get(step.key)
        self._looked.add(step.key)
        scope = self.settings.scope
        for backend in self.readers:
            if backend.url in self.down:
                continue
            for name in record_names(step.key, scope):
                # The default scope's record was written without a scope.
                in_scope = scope if scope and name != step.key else ""
                wanted = Wanted(name, in_scope, step.key, step.kind.value, step.id)
                try:
                    data = backend.get_record(name)
                    if data is None:
                        continue
                    record = decode_record(data, wanted, self.settings.trusted)
                except BadObject as exc:
                    self._ignore(backend, exc, step, fetching=False)
                    continue
                except RemoteCacheError as exc:
                    self._server_failed(backend, exc)
                    break
                self.found[step.key] = (backend, record)
                return backend, record
        return None

    def poll(self, step: Step) -> bool | None:
        """Look for a usable record of `step` again (`rfs build --shard`: another runner may
        have uploaded it since); None when no server is left to ask."""
        if all(backend.url in self.down for backend in self.readers):
            return None
        if step.key in self.bad:
            return None  # its copy failed to download: waiting more will not mend it
        self._looked.discard(step.key)
        self.found.pop(step.key, None)
        found = self.lookup(step)
        if found is None:
            return False
        stale = self.stale(step, found[1].fields) if self.stale is not None else None
        if stale is not None:  # an old record the owner has yet to replace
            del self.found[step.key]
            return False
        return True

    # -- downloading -----------------------------------------------------------------------

    def fetch(self, step: Step) -> bool:
        """Download the remote copy of `step` that planning found into the local cache (the
        layer into the engine); False if that copy turned out bad or its server failed, which
        is then a miss for the rest of the build (the caller plans again)."""
        found = self.found.get(step.key)
        if found is None or step.key in self.bad:
            return False
        backend, record = found
        if backend.url in self.down:
            self.bad.add(step.key)
            return False
        try:
            self._fetch_locked(step, backend, record)
        except BadObject as exc:
            self._ignore(backend, exc, step, fetching=True)
            self.bad.add(step.key)
            return False
        except RemoteCacheError as exc:
            self._server_failed(backend, exc)
            self.bad.add(step.key)
            return False
        return True

    def _fetch_locked(self, step: Step, backend: Backend, record: Record) -> None:
        def waiting() -> None:
            self.reporter.message(
                f"  waiting  {step.id:<10} another rfs process is fetching or building it"
            )

        with self.store.building(step.key, on_wait=waiting):
            if self.ex.missing(step) is None:
                return  # another process fetched or built it meanwhile
            t0 = time.monotonic()
            base: dict[str, Any] = {
                "kind": step.kind.value,
                "step": step.id,
                "inputs": dict(step.inputs),
                "fetched_from": backend.url,
            }
            if self.writer is not None and backend.url == self.writer.url:
                base["pushed"] = [backend.url]  # it is there already: no need to send it back
            with self._scratch() as tmp:
                nbytes = install(self.store, self.ex, step, backend, record, base, tmp)
            self.fetched.append(step.id)
            signed = f", signed by {record.signer}" if record.signer else ""
            self.reporter.message(
                f"  fetched  {step.id:<10} from {backend.url} "
                f"({_size(nbytes)} in {time.monotonic() - t0:.2f} s{signed})"
            )

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        # Inside the cache directory: downloads never land anywhere else.
        with tempfile.TemporaryDirectory(prefix="remote-", dir=self.store.root / "tmp") as tmp:
            yield Path(tmp)

    # -- uploading -------------------------------------------------------------------------

    def upload(self, steps: Sequence[Step], ran: set[str], cached: set[str]) -> None:
        """Send the steps this build ran (keys in `ran`), and those it found cached (`cached`)
        that the target lacks."""
        writer = self.writer
        if writer is None or writer.url in self.down:
            return
        pusher = Pusher(writer, self.store, self.ex, self.settings.sign_key)
        t0 = time.monotonic()
        pushed = sent = 0
        for step in steps:
            record = self.store.record(step.key)
            if step.kind is StepKind.BASE or record is None:
                continue  # failed steps have no record: they are never uploaded
            if writer.url in record.get("pushed", []):
                continue
            if step.key not in ran and step.key not in cached:
                continue
            try:
                scope = self.settings.scope or ""
                wanted = Wanted(
                    scoped_name(step.key, scope), scope, step.key, step.kind.value, step.id
                )
                if step.key in ran or not self._target_has(writer, wanted):
                    with self._scratch() as tmp:
                        pusher.push(step, record, wanted, tmp)
                    pushed += 1
                self._mark_pushed(step.key, writer.url)
            except BadObject as exc:
                self._warn(f"not uploading {step.id}: {exc.message}")
            except RemoteCacheError as exc:
                self._server_failed(writer, exc)
                return
            finally:
                sent += pusher.sent_bytes
                pusher.sent_bytes = 0
        self.sent_bytes += sent
        if pushed:
            self.reporter.message(
                f"  pushed   {pushed} step(s) to {writer.url} "
                f"({_size(sent)} sent in {time.monotonic() - t0:.2f} s)"
            )

    def unsent(self, key: str) -> bool:
        """Whether `upload` would consider the step of `key` (recorded here, with a target
        this build writes to, not marked as sent to it by an earlier upload): a cheap look
        before anything costlier is checked."""
        writer, record = self.writer, self.store.record(key)
        if writer is None or writer.url in self.down or record is None:
            return False
        return writer.url not in record.get("pushed", [])

    def _target_has(self, writer: Backend, wanted: Wanted) -> bool:
        """Whether the target holds a record of the step that readers will use: one that
        decodes, and is signed by this writer's key when it signs (a record signed by a key
        since rotated away is written again)."""
        data = writer.get_record(wanted.name)
        if data is None:
            return False
        try:
            decode_record(data, wanted, self.settings.trusted)
        except BadObject:
            return False
        return True

    def _mark_pushed(self, key: str, url: str) -> None:
        record = self.store.record(key)
        if record is not None:
            record["pushed"] = sorted({*record.get("pushed", []), url})
            self.store.put_record(key, record)
