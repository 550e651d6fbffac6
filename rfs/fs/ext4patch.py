"""Apply overlays to a finished ext4 image with debugfs instead of making the image again.

An overlay edit is the commonest change while iterating on a VM image. Rather than feed the
whole export to mke2fs again, rfs keeps an image of everything but the overlays (the "base
image", cached per export and filesystem settings) and writes the overlays into a copy of it
with `debugfs -w`: no mount, no root, a fraction of a second.

The patch must give exactly the tree the full route (`mke2fs -d -` of the filtered export with
the overlays appended) gives, so it is derived from the same plan (rfs.fs.plan), as it stood
before the overlays were laid out and after: export entries the overlays displace are removed,
the overlays (and any missing parent directory, 0755 root, as the stream adds them) are
written. Inode
fields are set to what mke2fs gives a tar entry: owner and mode from the overlay, mtime and
crtime the build's timestamp, atime and ctime 0. Anything the patch cannot reproduce exactly
(an overlay that replaces a directory, a name debugfs cannot be given) makes `derive_patch`
return a reason instead, and the caller takes the full route.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rfs.errors import RfsError
from rfs.fs import tarformat as tf
from rfs.fs.overlay import OverlayEntry
from rfs.fs.plan import Generated, make_plan
from rfs.fs.selection import Selection, ancestors
from rfs.host import proc
from rfs.host.hashing import digest_bytes, digest_json

# debugfs reads its commands through libss, which splits on blanks and honours double quotes
# but has no escapes: names with a quote, a backslash, a control character or bytes that are
# not UTF-8 cannot be written, so such patches take the full route.
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]|[\udc80-\udcff]')
_S_IFDIR, _S_IFREG = 0o040000, 0o100000
# The version line debugfs prints on stderr before anything else.
_BANNER = re.compile(r"^debugfs \d[\w.~+-]* \(.*\)$")


class PatchFailed(RfsError):
    """debugfs reported a problem; the caller falls back to making the image in full."""


@dataclass(frozen=True)
class Write:
    """A regular file to write: `content` at `path`."""

    path: str
    content: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class MakeDir:
    """A directory to create, or, with `exists`, an existing one to re-own and re-mode."""

    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    exists: bool = False


@dataclass(frozen=True)
class Link:
    """A symbolic link to create."""

    path: str
    target: str
    uid: int
    gid: int


@dataclass
class Patch:
    """What turns the base image into the image with overlays: removals first, then additions."""

    remove: list[str] = field(default_factory=list)
    add: list[Write | MakeDir | Link] = field(default_factory=list)
    missing_includes: list[str] = field(default_factory=list)  # as the stream would report


_ENTRIES = "export-headers.pickle"


def export_entries(export_tar: Path, side: Path) -> list[tf.RawEntry]:
    """The parsed headers of `export_tar`, kept in `side` (BaseImageCache.side_dir of the base
    image, keyed by the export's content and rfs's assembly code): an overlay edit then need
    not read the export again (180 MiB of pages for the Debian example, not always still in
    the page cache). An unreadable or damaged copy is parsed again and replaced."""
    cached = side / _ENTRIES
    with contextlib.suppress(Exception):  # unpickling damaged bytes can raise almost anything
        with cached.open("rb") as f:
            found = pickle.load(f)
        if isinstance(found, list) and all(isinstance(e, tf.RawEntry) for e in found):
            return found
    with export_tar.open("rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as view:
        entries = tf.index_archive(view)
    with contextlib.suppress(OSError):  # a cache that cannot keep it parses again next time
        side.mkdir(parents=True, exist_ok=True)
        tmp = side / f".{_ENTRIES}.{os.getpid()}"
        with tmp.open("wb") as f:
            pickle.dump(entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    return entries


def derive_patch(
    entries: list[tf.RawEntry],
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
) -> Patch | str:
    """The patch from the base image (no overlays) to the image with `overlays`, or the reason
    it cannot be made exactly (the caller then makes the image in full)."""
    plan = make_plan(entries, selection, overlays, restore)
    kinds: dict[str, bool] = {"/": True}  # path -> is a directory, as the base image holds it

    def present(path: str, is_dir: bool) -> None:
        for above in ancestors(path):
            kinds[above] = True  # the stream adds a missing parent as a directory
        kinds[path] = is_dir

    patch = Patch(missing_includes=plan.missing_includes)
    for i, path in enumerate(plan.paths):
        if not path or not plan.keep_without_overlays[i]:
            continue
        present(path, entries[i].typeflag == tf.DIRECTORY)
        if not plan.keep[i]:
            if entries[i].typeflag == tf.DIRECTORY:
                return f"an overlay replaces the directory {path}"
            patch.remove.append(path)
    created = len(plan.dropped_without_overlays)
    for was_dropped, entry in zip(plan.dropped_without_overlays, plan.generated, strict=False):
        if was_dropped:
            continue
        present(entry.path, entry.typeflag == tf.DIRECTORY)
        if entry.dropped:
            if entry.typeflag == tf.DIRECTORY:
                return f"an overlay replaces the directory {entry.path}"
            patch.remove.append(entry.path)
    patch.remove = list(dict.fromkeys(patch.remove))  # a path the export holds twice goes once
    for path in patch.remove:
        kinds.pop(path, None)
    for generated in plan.generated[created:]:
        if generated.dropped:
            continue  # a later overlay took its place
        problem = _add(patch, kinds, generated)
        if problem:
            return problem
    for path in patch.remove:
        if _UNSAFE.search(path):
            return f"debugfs cannot be given the name {path!r}"
    return patch


def _add(patch: Patch, kinds: dict[str, bool], entry: Generated) -> str | None:
    """Append the operations that write `entry`; return a reason if it cannot be patched."""
    path = entry.path
    if _UNSAFE.search(path) or _UNSAFE.search(entry.target):
        return f"debugfs cannot be given the name {path!r}"
    for above in ancestors(path):
        is_dir = kinds.get(above)
        if is_dir is None:
            patch.add.append(MakeDir(above, 0o755))
            kinds[above] = True
        elif not is_dir:
            return f"{above} is in the way of the overlay {path}"
    existing = kinds.get(path)
    if entry.typeflag == tf.DIRECTORY:
        if existing is False:
            return f"the overlay directory {path} replaces a file"
        patch.add.append(MakeDir(path, entry.mode, entry.uid, entry.gid, exists=bool(existing)))
        kinds[path] = True
        return None
    if existing is not None:
        return f"{path} is written twice"
    if entry.typeflag == tf.SYMLINK:
        patch.add.append(Link(path, entry.target, entry.uid, entry.gid))
    elif entry.typeflag == tf.REGULAR:
        patch.add.append(Write(path, entry.content, entry.mode, entry.uid, entry.gid))
    else:
        return f"the overlay {path} is neither a file, a directory nor a symlink"
    kinds[path] = False
    return None


def _commands(patch: Patch, files: Path, mtime: int) -> list[str]:
    """The debugfs script of `patch`; file contents go to `files` first."""
    lines = [f'rm "{path}"' for path in patch.remove]

    def fields(path: str, mode: int | None, uid: int, gid: int) -> None:
        if mode is not None:
            lines.append(f'sif "{path}" mode 0{mode:o}')
        lines.extend([f'sif "{path}" uid {uid}', f'sif "{path}" gid {gid}'])
        # What mke2fs gives a tar entry: the archive's mtime; no atime or ctime in the archive.
        lines.extend(
            f'sif "{path}" {name} @{value}'
            for name, value in (("mtime", mtime), ("crtime", mtime), ("atime", 0), ("ctime", 0))
        )

    for number, op in enumerate(patch.add):
        if isinstance(op, Write):
            source = files / str(number)
            source.write_bytes(op.content)
            lines.append(f'write "{source}" "{op.path}"')
            fields(op.path, _S_IFREG | op.mode, op.uid, op.gid)
        elif isinstance(op, Link):
            lines.append(f'symlink "{op.path}" "{op.target}"')
            fields(op.path, None, op.uid, op.gid)
        elif op.exists:  # mke2fs gives an existing directory the later entry's mode,
            lines.append(f'sif "{op.path}" mode 0{_S_IFDIR | op.mode:o}')  # owner and mtime
            lines.extend(
                [
                    f'sif "{op.path}" uid {op.uid}',
                    f'sif "{op.path}" gid {op.gid}',
                    f'sif "{op.path}" mtime @{mtime}',
                ]
            )
        else:
            lines.append(f'mkdir "{op.path}"')
            fields(op.path, _S_IFDIR | op.mode, op.uid, op.gid)
    return lines


def patch_digest(patch: Patch, *, mtime: int, fs_uuid: uuid.UUID | None) -> str:
    """What identifies the bytes `apply_patch` writes (for the in-place state's record)."""
    ops = [
        [type(op).__name__, {**vars(op), "content": digest_bytes(op.content)}]
        if isinstance(op, Write)
        else [type(op).__name__, vars(op)]
        for op in patch.add
    ]
    return digest_json({"remove": patch.remove, "add": ops, "mtime": mtime, "uuid": str(fs_uuid)})


def apply_patch(
    image: Path, patch: Patch, *, mtime: int, fs_uuid: uuid.UUID | None, undo: Path
) -> None:
    """Write `patch` into the ext4 `image` in place (and set its UUID), keeping the bytes it
    overwrites in the new undo file `undo` (`e2undo` puts them back; see rfs.fs.ext4inplace).
    Raise PatchFailed if debugfs reports any problem, leaving `image` for the caller to
    discard or roll back. debugfs is never stopped half-way: an interrupt waits for it."""
    with tempfile.TemporaryDirectory(prefix="rfs-debugfs-") as tmp:
        lines = _commands(patch, Path(tmp), mtime)
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
