"""Write the difference between two trees into a finished ext4 image with debugfs, instead of
making the image again.

An overlay edit is the commonest change while iterating on a VM image. Rather than feed the
whole export to mke2fs again, rfs keeps an image of everything but the overlays (the "base
image", cached per export and filesystem settings) and writes the overlays into a copy of it
with `debugfs -w`: no mount, no root, a fraction of a second.

The patch must give exactly the tree the full route (`mke2fs -d -` of the filtered export with
the overlays appended) gives, so it is derived from the same plan (rfs.fs.plan), as it stood
before the overlays were laid out and after: both are turned into trees (rfs.fs.treediff) and
the patch is their difference (removed subtrees, type changes, hard links, xattrs, devices,
metadata). Anything the patch cannot reproduce exactly (a name debugfs cannot be given, a
directory that would shrink) makes `derive_patch` return a reason instead, and the caller
takes the full route. `diff_exports` does the same for two exports (a "before" and an "after"
tree, e.g. an image and the next layer's).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import re
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from rfs.errors import RfsError
from rfs.fs import tarformat as tf
from rfs.fs.ext4ops import Patch, commands, digest
from rfs.fs.overlay import OverlayEntry
from rfs.fs.plan import Plan, make_plan
from rfs.fs.plantree import Header, read_headers, region, tree_of_plan
from rfs.fs.selection import Selection
from rfs.fs.treediff import Tree, diff_trees
from rfs.host import proc

# The version line debugfs prints on stderr before anything else.
_BANNER = re.compile(r"^debugfs \d[\w.~+-]* \(.*\)$")


class PatchFailed(RfsError):
    """debugfs reported a problem; the caller falls back to making the image in full."""


_ENTRIES = "export-headers-3.pickle"


def export_index(
    export_tar: Path, side: Path, digest: str | None = None
) -> tuple[list[tf.RawEntry], list[Header]]:
    """The parsed headers of `export_tar` (entries, and owner, mode, time and device of each),
    kept in `side` (BaseImageCache.side_dir of the base image, keyed by the export's content
    and rfs's assembly code): an overlay edit then need not read the export again (180 MiB of
    pages for the Debian example, not always still in the page cache). An unreadable or
    damaged copy is replaced, and so is one kept for other content than `digest` (the
    export's content hash, when `side` belongs to a step key: a step run again, with
    --rebuild or --no-cache, can write other bytes under the same key). Remembered for the
    process too (by the file's identity): a cold build reads one export in several steps (the
    diff steps after an anchor, the assembly), each with a side directory of its own. The
    lists are shared: callers must not change them."""
    cached = side / _ENTRIES
    try:
        st = export_tar.stat()
        identity: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None  # _parse says what is wrong with it
    found = _load(cached, digest)
    if found is not None:
        _remember(identity, found)
        return found
    found = _REMEMBERED.get(identity) if identity is not None else None
    if found is None:
        found = _parse(export_tar)
        _remember(identity, found)
    _keep(found, cached, digest)  # it was missing, damaged or of other content there
    return found


def _keep(index: tuple[list[tf.RawEntry], list[Header]], cached: Path, digest: str | None) -> None:
    """Write `index` (of the content `digest`) to `cached`; a cache that cannot keep it
    parses again next time."""
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}")
        with tmp.open("wb") as f:
            pickle.dump((digest, *index), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)


_REMEMBERED: dict[tuple[int, ...], tuple[list[tf.RawEntry], list[Header]]] = {}
_REMEMBERED_MAX = 4


def _remember(
    identity: tuple[int, ...] | None, index: tuple[list[tf.RawEntry], list[Header]]
) -> None:
    if identity is None:
        return
    _REMEMBERED[identity] = index  # one assignment, then a trim: safe between step threads
    for old in list(_REMEMBERED)[:-_REMEMBERED_MAX]:
        _REMEMBERED.pop(old, None)


def _load(cached: Path, digest: str | None) -> tuple[list[tf.RawEntry], list[Header]] | None:
    """The parsed headers kept at `cached`, or None when missing, damaged or kept for other
    content than `digest` (None: any)."""
    with contextlib.suppress(Exception):  # unpickling damaged bytes can raise almost anything
        with cached.open("rb") as f:
            found = pickle.load(f)
        if _valid(found) and (digest is None or found[0] == digest):
            return found[1], found[2]
    return None


def _valid(found: object) -> bool:
    if not (isinstance(found, tuple) and len(found) == 3):
        return False
    kept_for, entries, headers = found
    return (
        (kept_for is None or isinstance(kept_for, str))
        and isinstance(entries, list)
        and isinstance(headers, list)
        and len(entries) == len(headers)
        and all(isinstance(e, tf.RawEntry) for e in entries)
        and all(isinstance(h, Header) for h in headers)
    )


def _parse(export_tar: Path) -> tuple[list[tf.RawEntry], list[Header]]:
    with export_tar.open("rb") as src:
        if os.fstat(src.fileno()).st_size == 0:
            return [], []  # mmap refuses an empty file; index_archive would refuse it too
        with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as view:
            entries = tf.index_file(src.fileno(), view)
            return entries, read_headers(view, entries)


def export_entries(export_tar: Path, side: Path, digest: str | None = None) -> list[tf.RawEntry]:
    """The parsed entries of `export_tar`, kept in `side` (see export_index)."""
    return export_index(export_tar, side, digest)[0]


def derive_patch(
    index: tuple[list[tf.RawEntry], list[Header]],
    export_tar: Path,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
    *,
    mtime: int,
) -> Patch | str:
    """The patch from the base image (no overlays) to the image with `overlays`, or the reason
    it cannot be made exactly (the caller then makes the image in full). `index` is
    export_index of `export_tar`; `mtime` the build's timestamp."""
    entries, headers = index
    plan = make_plan(entries, selection, overlays, restore)
    # Only what the overlays can change becomes a tree: the rest is the same in both.
    only, outside = region(plan)
    trees = [
        tree_of_plan(plan, headers, export_tar, mtime=mtime, before_overlays=b, only=only)
        for b in (True, False)
    ]
    before, after = trees
    if isinstance(before, str):
        return before
    if isinstance(after, str):
        return after
    return diff_trees(before, after, missing_includes=plan.missing_includes, outside=outside)


def derive_layered_patch(
    index: tuple[list[tf.RawEntry], list[Header]],
    export_tar: Path,
    layers: Sequence[Path],
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
    *,
    mtime: int,
) -> Patch | str:
    """The patch from the base image of `export_tar` (no overlays) to the image of the export
    with `layers` laid on it (rfs.fs.layered) and `overlays`, or the reason it cannot be made
    exactly. `index` is export_index of `export_tar`."""
    from rfs.fs.layered import Unlayerable, apply_layers, bases, shifted

    entries, headers = index
    before_plan = make_plan(entries, selection, (), restore)
    paths = [export_tar, *layers]
    try:
        starts = bases([path.stat().st_size for path in paths])
        head_of = {id(e): h for e, h in zip(entries, headers, strict=True)}
        diffs = []
        for path, base in zip(layers, starts[1:], strict=True):
            data = path.read_bytes()  # a layer diff is small: the chain's size is bounded
            own = tf.index_archive(data)
            moved = shifted(own, base)
            head_of.update((id(e), h) for e, h in zip(moved, read_headers(data, own), strict=True))
            diffs.append(moved)
        merged = apply_layers(entries, diffs)
    except Unlayerable as exc:
        return str(exc)
    except (OSError, tf.TarError) as exc:
        return f"a layer diff cannot be read: {exc}"

    def locate(offset: int) -> tuple[Path, int]:
        i = max(j for j, start in enumerate(starts) if start <= offset)
        return paths[i], offset - starts[i]

    plan = make_plan(merged, selection, overlays, restore)
    only, outside = region(plan, _changed_by_layers(entries, before_plan, merged, plan))
    before = tree_of_plan(before_plan, headers, export_tar, mtime=mtime, only=only)
    if isinstance(before, str):
        return before
    after = tree_of_plan(plan, [head_of[id(e)] for e in merged], locate, mtime=mtime, only=only)
    if isinstance(after, str):
        return after
    return diff_trees(before, after, missing_includes=plan.missing_includes, outside=outside)


def _changed_by_layers(
    entries: list[tf.RawEntry], before: Plan, merged: list[tf.RawEntry], after: Plan
) -> set[str]:
    """The paths the layers can change (as region's overlays: only they become trees): those
    of the layers' entries, the export's entries they replaced or removed, and any path whose
    selection changed with them (a layer can change a symlink the selection follows)."""
    in_export = {id(e) for e in entries}
    in_merged = {id(e) for e in merged}
    changed = {p for e, p in zip(merged, after.paths, strict=True) if p and id(e) not in in_export}
    changed |= {
        p for e, p in zip(entries, before.paths, strict=True) if p and id(e) not in in_merged
    }
    kept_before = dict(zip(before.paths, before.keep, strict=True))
    kept_after = dict(zip(after.paths, after.keep_without_overlays, strict=True))
    changed |= {
        p
        for p in kept_before.keys() | kept_after.keys()
        if p and kept_before.get(p) != kept_after.get(p)
    }
    return changed


def tree_of_export(
    export_tar: Path,
    selection: Selection,
    overlays: Sequence[OverlayEntry] = (),
    restore: Mapping[str, bytes] | None = None,
    *,
    mtime: int,
) -> Tree | str:
    """The tree `assemble_ext4` makes of `export_tar` with `selection`, `overlays` and
    `restore` (with `mtime` its source_date_epoch), or why it cannot be told. Give diff_trees
    two of them to patch an image of one export into the image of the other."""
    entries, headers = _parse(export_tar)
    plan = make_plan(entries, selection, overlays, restore or {})
    return tree_of_plan(plan, headers, export_tar, mtime=mtime)


def patch_digest(patch: Patch, *, mtime: int, fs_uuid: uuid.UUID | None) -> str:
    """What identifies the bytes `apply_patch` writes (for the in-place state's record)."""
    return digest(patch, mtime=mtime, uuid=str(fs_uuid))


def apply_patch(
    image: Path, patch: Patch, *, mtime: int, fs_uuid: uuid.UUID | None, undo: Path
) -> None:
    """Write `patch` into the ext4 `image` in place (and set its UUID), keeping the bytes it
    overwrites in the new undo file `undo` (`e2undo` puts them back; see rfs.fs.ext4inplace).
    Raise PatchFailed if debugfs reports any problem, leaving `image` for the caller to
    discard or roll back. debugfs is never stopped half-way: an interrupt waits for it."""
    with tempfile.TemporaryDirectory(prefix="rfs-debugfs-") as tmp:
        lines = commands(patch, Path(tmp), mtime)
        if fs_uuid is not None:
            lines.append(f"ssv uuid {fs_uuid}")
        script = Path(tmp, "script")
        script.write_text("\n".join(lines) + "\n")
        env = {"E2FSPROGS_FAKE_TIME": str(mtime), "SOURCE_DATE_EPOCH": str(mtime)}
        result = proc.run(
            # The undo file changes what debugfs counts as written (the superblock's
            # lifetime-writes field): every route writes one, so their bytes agree.
            [proc.tool_path("debugfs"), "-z", str(undo), "-w", "-f", str(script), str(image)],
            env=env,
            what="debugfs (writing the overlays)",
            shielded=True,
        )
    # debugfs carries on after a failed command and exits 0: its stderr is the only sign.
    problems = [
        line
        for line in result.stderr.decode("utf-8", "replace").splitlines()
        if line.strip() and not _BANNER.match(line)
    ]
    if problems:
        raise PatchFailed("debugfs could not write the overlays: " + "; ".join(problems[:5]))
