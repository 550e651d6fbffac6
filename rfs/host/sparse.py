"""Sparse files: where their data is. Images are mostly holes, so rfs reads only the data."""

from __future__ import annotations

import os
from pathlib import Path


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) ranges of `path` that hold data; holes read as zeros."""
    extents: list[tuple[int, int]] = []
    size = path.stat().st_size
    with path.open("rb") as f:
        fd = f.fileno()
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end - start))
            offset = end
    return extents
