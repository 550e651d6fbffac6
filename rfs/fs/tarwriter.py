"""Reading an export whole and writing the image stream from it (see rfs.fs.tarstream)."""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO

from rfs.fs import tarformat as tf
from rfs.fs.layered import Segments

_CHUNK = 8 << 20  # bytes per write when copying without sendfile


@contextlib.contextmanager
def mapped(source: BinaryIO) -> Iterator[tuple[tf.Buffer, int | None]]:
    """The whole of `source`: mapped when it is a real file, else read (a BytesIO in place)."""
    try:
        fd: int | None = source.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            try:
                mapping.madvise(mmap.MADV_SEQUENTIAL)
                yield mapping, fd
            finally:
                with contextlib.suppress(BufferError):  # a traceback may still pin a view
                    mapping.close()
            return
    if isinstance(source, io.BytesIO):
        yield source.getvalue(), None  # no copy when it wraps bytes (getbuffer would copy)
        return
    source.seek(0)
    yield source.read(), None


class Writer:
    """Writes the stream, merging adjacent untouched spans of the export into one copy.

    The export may come with layers (rfs.fs.layered.Segments): a span is then copied from
    the archive it lies in."""

    def __init__(
        self, buf: tf.Buffer, src_fd: int | None, out: BinaryIO, layered: Segments | None = None
    ) -> None:
        self._base = memoryview(buf)
        self.view: memoryview | Segments = self._base.cast("B") if layered is None else layered
        self._madvise = buf.madvise if isinstance(buf, mmap.mmap) else None
        self._layered = layered
        self.src_fd = src_fd
        self.out = out
        self.out_fd: int | None = None
        if src_fd is not None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                self.out_fd = out.fileno()
        self.start = self.end = 0
        self.written = 0

    def copy(self, start: int, end: int) -> None:
        """Queue export bytes [start, end) for output."""
        if start == self.end and self.end > self.start:
            self.end = end
        else:
            self.flush()
            self.start, self.end = start, end

    def write(self, data: bytes) -> None:
        """Write new bytes (after anything queued)."""
        self.flush()
        self.out.write(data)
        self.written += len(data)

    def flush(self) -> None:
        """Write out the queued span of the export."""
        start, end = self.start, self.end
        self.start = self.end = 0
        if end <= start:
            return
        self.written += end - start
        if self._layered is not None:
            part = self._layered.locate(start)
            base = self._layered.bases[part]
            view, fd = self._layered.parts[part]
            self._send(view, fd, start - base, end - base, None)
            return
        self._send(self.view, self.src_fd, start, end, self._madvise)

    def _send(
        self,
        view: memoryview | Segments,
        src_fd: int | None,
        start: int,
        end: int,
        madvise: Callable[[int, int, int], None] | None,
    ) -> None:
        if self.out_fd is not None and src_fd is not None:
            self.out.flush()
            try:
                while start < end:
                    sent = os.sendfile(self.out_fd, src_fd, start, end - start)
                    if sent == 0:
                        raise tf.TarError("the export tarball shrank while it was being read")
                    start += sent
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.out_fd = None  # this pair of files cannot sendfile: copy from the map
        for pos in range(start, end, _CHUNK):
            stop = min(end, pos + _CHUNK)
            self.out.write(view[pos:stop])
            if madvise is not None:  # unmap what was copied: RSS stays flat
                first = pos & ~(mmap.PAGESIZE - 1)
                madvise(mmap.MADV_DONTNEED, first, (stop & ~(mmap.PAGESIZE - 1)) - first)

    def close(self) -> None:
        """Release the export's buffer (a mmap cannot close while views of it exist)."""
        if self._layered is not None:
            self._layered.release()
        else:
            assert isinstance(self.view, memoryview)
            self.view.release()
        self._base.release()
