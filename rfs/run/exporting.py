"""Streaming an image's export (a created, never started container) into the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rfs.errors import EngineError
from rfs.graph.steps import Step
from rfs.run.store import BlobWriter, Store

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from rfs.engine.base import BinarySink, Engine
    from rfs.report.reporter import Reporter


class _TarEnd:
    """A sink that passes writes on and keeps the last 1 KiB: a complete tar archive ends with
    two zero blocks (the end-of-archive marker Docker's and Podman's Go tar writers add)."""

    def __init__(self, sink: BinarySink) -> None:
        self._sink = sink
        self._tail = b""

    def write(self, data: bytes, /) -> object:
        """Write `data` on, remembering the end of the stream."""
        result = self._sink.write(data)
        self._tail = (self._tail + bytes(data[-1024:]))[-1024:]
        return result

    def complete(self) -> bool:
        """True if what went through ends with the end-of-archive marker."""
        return len(self._tail) == 1024 and not any(self._tail)


def complete_export(export: Callable[[BinarySink], None], path: Path, what: str) -> tuple[int, str]:
    """Write what `export` streams (an engine's export of `what`) to the new file `path`,
    hashing it on the way; return its size and content hash. Raises EngineError when the
    stream lacks the end-of-archive marker; the caller deletes `path` on failure."""
    writer = BlobWriter(path)
    try:
        sink = _TarEnd(writer)
        export(sink)
    finally:
        writer.close()
    _require_end(sink, writer.size, what)
    return writer.size, writer.digest


def _require_end(sink: _TarEnd, size: int, what: str) -> None:
    """Raise EngineError unless the stream that went through `sink` ended as a tar archive
    does: a stream cut short (the engine stopped or crashed) can end cleanly at a chunk
    boundary, and an export without the end-of-archive marker must never be cached."""
    if not sink.complete():
        raise EngineError(
            f"the export of {what} ended early ({size} bytes, no end-of-archive marker): "
            "did the engine stop?"
        )


def export_into(
    engine: Engine,
    store: Store,
    image: str,
    key: str,
    labels: Mapping[str, str],
    reporter: Reporter,
    step: Step,
    *,
    platform: str | None = None,
) -> tuple[int, str]:
    """Export `image` into the blob of `key`; return its size and content hash. An export
    cut short is never kept."""
    # The progress display's total: the image's size, which the tarball differs from by
    # its headers (a few percent).
    try:
        total = engine.image_size(image)
    except EngineError:
        total = None
    with store.write_blob(key) as writer:
        sink = _TarEnd(writer)
        engine.export(
            image,
            sink,
            labels=labels,
            on_progress=lambda n: reporter.progress(step, n, total),
            platform=platform,
        )
        _require_end(sink, writer.size, image)
    return writer.size, writer.digest
