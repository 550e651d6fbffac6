"""Exporting a command's container while the engine commits it.

A cold build's full export (the EXPORT step, or a DIFF step that becomes an anchor:
rfs.run.layerchain) used to start once the commit of the command's layer had ended. Docker's
commit copies the layer (8.4 s for the benchmark's 1.5 GiB file), and the export then read it
all again. The export of the stopped container is the export of the image it is committed as,
but for what the engine masks in every container made from an image (Docker's init layer:
/etc/mtab, /etc/hosts, /.dockerenv, /dev and /etc as directories… which a command may have
changed), and for the times of those entries (which differ between any two exports, and which
no image keeps: mke2fs sets every time to SOURCE_DATE_EPOCH). So once a command has succeeded,
the RUN step looks at the container's layer directory (local overlay storage, no file read)
and, if the command left those alone, exports the container alongside the commit; the step
that needs the export adopts it instead of exporting.

Which RUN steps: the last command of a build with an EXPORT step; in a layered build, a
command whose change holds more than a chain may (`CHAIN_DATA_BYTES`, `CHAIN_ENTRIES`), so its
DIFF step makes an anchor whatever the chain before it holds. Nothing else changes: the DIFF
step decides as before and takes the early export only where it would have exported. An early
export that fails, or that no step adopts, is deleted (`settle`); the step then exports as
before.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import RfsError
from rfs.run.exporting import complete_export

if TYPE_CHECKING:
    from collections.abc import Callable

    from rfs.engine.base import Engine
    from rfs.engine.layerdiff import Limit
    from rfs.graph.steps import Step
    from rfs.run.store import Store
    from rfs.script.model import BuildScript

log = logging.getLogger("rfs.run")


@dataclass(frozen=True)
class Exported:
    """An early export, written to a partial file of the store."""

    path: Path
    size: int
    digest: str


class EarlyExports:
    """The exports a build's RUN steps start while their commits run, by RUN step key."""

    def __init__(self, store: Store, engine: Callable[[], Engine]) -> None:
        self._store = store
        self._engine = engine
        self._pool: cf.ThreadPoolExecutor | None = None
        self._started: dict[str, cf.Future[Exported]] = {}
        self._lock = threading.Lock()

    def hook_for(
        self, script: BuildScript, step: Step
    ) -> Callable[[str], cf.Future[Any] | None] | None:
        """What `Engine.run_and_commit` calls once the command of RUN step `step` of `script`
        has succeeded, to export its container (see the module doc), or None."""
        from rfs.run.layerchain import chain_limit

        if script.layered:
            return self.hook(step.key, over=chain_limit())
        if step.index == len(script.commands) - 1:
            return self.hook(step.key, over=None)  # the EXPORT step reads it
        return None

    def hook(self, run_key: str, *, over: Limit | None) -> Callable[[str], cf.Future[Any] | None]:
        """What `Engine.run_and_commit` calls once the command of RUN step `run_key` has
        succeeded: it starts the export of the container when that exports as the image it is
        committed as and (unless `over` is None) its change holds more than `over`."""

        def start(cid: str) -> cf.Future[Any] | None:
            try:
                if not self._engine().exports_as_committed(cid, over):
                    return None
            except RfsError as exc:  # the step's own export will say what is wrong
                log.info("not exporting container %s early: %s", cid[:12], exc)
                return None
            with self._lock:
                if self._pool is None:
                    self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="rfs-early-export")
                future = self._pool.submit(self._export, cid, run_key)
                self._started[run_key] = future
            return future

        return start

    def _export(self, cid: str, run_key: str) -> Exported:
        path = self._store.part_path(f"early-{run_key}")
        try:
            size, digest = complete_export(
                lambda sink: self._engine().export_container(cid, sink), path, f"container {cid}"
            )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return Exported(path, size, digest)

    def adopt(self, run_key: str, key: str) -> tuple[int, str] | None:
        """The early export of RUN step `run_key`'s container, once complete, made the blob of
        `key`: its size and content hash; None when none was started or it failed."""
        with self._lock:
            future = self._started.pop(run_key, None)
        if future is None:
            return None
        try:
            found = future.result()
        except Exception as exc:  # the caller exports as before
            log.info("the early export of %s failed; exporting the image: %s", run_key[:12], exc)
            return None
        self._store.adopt(key, found.path, found.digest)
        log.info("the export of %s's container, made while it was committed", run_key[:12])
        return found.size, found.digest

    def settle(self) -> None:
        """Wait for the early exports still running, and delete those no step took."""
        with self._lock:
            left, self._started = list(self._started.values()), {}
        for future in left:
            with contextlib.suppress(Exception):
                exported = future.result()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(exported.path)
