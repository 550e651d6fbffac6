"""Side outputs (`[[outputs]]`): files of the final tree written next to the image.

The content comes from the same plan the image stream is written from (the export, the
selection, the created paths, the overlays and the /etc fixes), so a side output is exactly
the file the image holds, or would hold without `remove`. Symlinks on the way and at the path
are followed inside the image, never on the host. `remove` leaves the file out of the image
through an exact exclude (see `removal_globs`), the route every image type already takes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from rfs.errors import RfsError
from rfs.fs import tarformat as tf
from rfs.fs.overlay import OverlayEntry
from rfs.fs.plan import make_plan
from rfs.fs.selection import Selection, decode, normalise, resolve

_MAX_LINK_HOPS = 40


def removal_globs(paths: Sequence[str]) -> tuple[str, ...]:
    """Exclude globs that match exactly `paths` (fnmatch's special characters escaped)."""
    return tuple(re.sub(r"([*?[])", r"[\1]", path) for path in paths)


def extract(
    export_tar: Path,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
    paths: Sequence[tuple[str, str]],
) -> dict[str, tuple[bytes, int]]:
    """The content and mode of each (field, image path) of `paths` in the final tree.

    Raises RfsError naming the field when a path is missing or not a regular file.
    """
    with export_tar.open("rb") as f:
        size = export_tar.stat().st_size
        buf: tf.Buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            return _extract(buf, selection, overlays, restore, paths)
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()


def _extract(
    buf: tf.Buffer,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
    paths: Sequence[tuple[str, str]],
) -> dict[str, tuple[bytes, int]]:
    plan = make_plan(tf.index_archive(buf), selection, overlays, restore)
    # The final tree: the kept export entries, then what rfs adds (later ones win).
    final: dict[str, tuple[int, bytes | tf.RawEntry, str]] = {}
    modes: dict[str, int] = {}  # of generated entries (an export entry's is in its header)
    for entry, path, keep in zip(plan.entries, plan.paths, plan.keep, strict=True):
        if path and keep:
            final[path] = (entry.typeflag, entry, decode(entry.linkname))
    for generated in plan.generated:
        if not generated.dropped:
            final[generated.path] = (generated.typeflag, generated.content, generated.target)
            modes[generated.path] = generated.mode

    def symlink(path: str) -> str | None:
        found = final.get(path)
        return found[2] if found is not None and found[0] == tf.SYMLINK else None

    out: dict[str, tuple[bytes, int]] = {}
    view = memoryview(buf)
    try:
        for field, wanted in paths:
            where, _ = resolve(wanted, symlink, follow_last=True)
            found = final.get(where)
            hops = 0
            while found is not None and found[0] == tf.HARDLINK and hops < _MAX_LINK_HOPS:
                target = normalise(decode(found[1].linkname))  # type: ignore[union-attr]
                linked = plan.by_path.get(target)
                found = (linked.typeflag, linked, "") if linked is not None else None
                hops += 1
            if found is None:
                raise RfsError(f"{field}: {wanted} is not in the image")
            typeflag, data, _ = found
            if typeflag not in tf.REGULAR_TYPES:
                raise RfsError(f"{field}: {wanted} is not a regular file in the image")
            if isinstance(data, bytes):
                out[wanted] = (data, modes.get(where, 0o644))
                continue
            mode = tf.parse_number(bytes(view[data.header + 100 : data.header + 108])) & 0o7777
            if data.size == 0 and where in plan.restore:
                out[wanted] = (plan.restore[where], 0o644)  # an engine-emptied /etc file
            else:
                out[wanted] = (bytes(view[data.data : data.data + data.size]), mode)
    finally:
        view.release()
    return out


def identity(path: Path) -> list[int] | None:
    """What identifies a side output rfs wrote (size, mtime, inode, device); None if gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def write(
    image: Path,
    outputs: Sequence[tuple[str, str]],
    contents: Mapping[str, tuple[bytes, int]],
    by_path: Mapping[str, str],
) -> dict[str, list[int] | None]:
    """Write each (field, `to`) of `outputs` next to `image`, atomically (a temporary file in
    the same directory, renamed), with its image mode less setuid, setgid and sticky.

    `by_path` maps each `to` to its image path in `contents`. Returns each written file's
    identity by absolute path, for the record.
    """
    written: dict[str, list[int] | None] = {}
    directory = image.resolve().parent
    for field, to in outputs:
        target = directory / to
        if target.resolve() == image.resolve():
            raise RfsError(f"{field}: {to} is the image itself; give the side output another name")
        content, mode = contents[by_path[to]]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.rfs-tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(tmp, mode & 0o777)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        written[str(target)] = identity(target)
    return written
