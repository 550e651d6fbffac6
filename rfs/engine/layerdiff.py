"""What one command changed: the top layer of an image, as a normalised OCI layer tarball.

A late command usually changes a few files of a big tree; what it changed is its image's top
layer. Two ways to read that layer, which give the same bytes:

- `write_upper_dir`: walk the layer's directory in the engine's overlay storage (Docker's
  overlay2, Podman's overlay: `GraphDriver.Data.UpperDir` of the image) where the engine is on
  this machine. Milliseconds for a small change, however big the image is.
- `normalise_layer`: rewrite a layer tarball (the last layer of `docker save`, or the fake
  engine's) into the same form; anything the walk cannot read exactly falls back to it.

The normalised form (`FORMAT`): entries sorted by path, parents first; names relative
(`etc/passwd`, directories with a trailing slash); no root entry; a deletion is an empty
regular file `DIR/.wh.NAME`, a directory whose lower contents are hidden has an empty
`DIR/.wh..wh..opq` right after it (both with mode 0, owner 0, mtime 0); the second and later
names of an inode are hard links to the first name in that order; numeric owners only;
extended attributes as PAX `SCHILY.xattr.NAME` records (overlayfs's own `trusted.overlay.*`
left out); whole-second mtimes. So a layer's normalised tarball depends only on the layer.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rfs.errors import EngineError

FORMAT = "rfs-layer-diff/1"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
# A layer that needs its lower layers to be read (a renamed directory or a metadata-only copy
# up): the upper directory alone does not hold its content, so the walk gives up.
_NEEDS_LOWER = ("overlay.redirect", "overlay.metacopy")
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


class TooLarge(Exception):
    """The layer holds more than the limit: the caller treats it as a big change."""


class Unreadable(Exception):
    """The upper directory cannot be read exactly (see _NEEDS_LOWER): use the tarball route."""


@dataclass(frozen=True)
class Limit:
    """How big a change may be and still count as small: file bytes and entries."""

    data_bytes: int
    entries: int


@dataclass
class _Item:
    """One normalised entry before it is written."""

    name: str  # relative, no trailing slash
    info: tarfile.TarInfo
    source: Path | None = None  # regular file content, from the upper directory
    data: bytes | None = None  # content given whole (the markers' empty one)
    member: tarfile.TarInfo | None = None  # regular file content, in the layer tarball
    inode: object = None  # the same for every name of one regular file


class _Budget:
    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.data = 0
        self.entries = 0

    def take(self, data: int) -> None:
        self.entries += 1
        self.data += data
        if self.entries > self.limit.entries or self.data > self.limit.data_bytes:
            raise TooLarge


def _info(name: str, kind: bytes, *, mode: int = 0, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _marker(name: str) -> _Item:
    return _Item(name, _info(name, tarfile.REGTYPE), data=b"")


def _xattr_records(xattrs: dict[str, str]) -> dict[str, str]:
    return {
        f"SCHILY.xattr.{key}": value
        for key, value in sorted(xattrs.items())
        if not key.startswith(_OVERLAY_XATTRS)
    }


def write_upper_dir(upper: Path, out: BinaryIO, limit: Limit) -> None:
    """Write the normalised tarball of the overlay layer directory `upper` to `out`.

    Raises TooLarge past `limit` (stops reading there), Unreadable when the directory does not
    hold the whole layer (redirects, metacopy) or cannot be read."""
    budget = _Budget(limit)
    items: list[_Item] = []
    inodes: set[tuple[int, int]] = set()
    for rel, st in _walk(upper, ""):
        path = upper / rel
        xattrs = _xattrs(path)
        if any(key.endswith(suffix) for key in xattrs for suffix in _NEEDS_LOWER):
            raise Unreadable(f"{rel} needs the lower layers ({sorted(xattrs)})")
        mode = stat.S_IMODE(st.st_mode)
        parent, _, base = rel.rpartition("/")
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            budget.take(0)
            items.append(_marker(f"{parent}/{WHITEOUT}{base}" if parent else WHITEOUT + base))
            continue
        owner = {"mode": mode, "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISDIR(st.st_mode):
            info = _info(rel + "/", tarfile.DIRTYPE, **owner)
        elif stat.S_ISREG(st.st_mode):
            info = _info(rel, tarfile.REGTYPE, **owner)
        elif stat.S_ISLNK(st.st_mode):
            info = _info(rel, tarfile.SYMTYPE, **owner)
            info.linkname = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info = _info(rel, kind, **owner)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            info = _info(rel, tarfile.FIFOTYPE, **owner)
        else:
            continue  # sockets: tar has no type for them, and engines leave them out too
        info.mtime = int(st.st_mtime)
        info.pax_headers = _xattr_records(
            {k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
        )
        item = _Item(rel, info)
        if stat.S_ISREG(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            item.inode = ident if st.st_nlink > 1 else None
            item.source = path
            info.size = st.st_size
            budget.take(0 if ident in inodes else st.st_size)
            inodes.add(ident)
        else:
            budget.take(0)
        items.append(item)
        if stat.S_ISDIR(st.st_mode) and any(xattrs.get(k) == b"y" for k in _OPAQUE_XATTRS):
            budget.take(0)
            items.append(_marker(f"{rel}/{OPAQUE}"))
    _write(_finish(items), out)


# What Docker's init layer puts above an image's layers in every container (moby's
# initlayer.Setup): a container made from the committed image shows these, not what the
# command left there, so a command that changed them exports otherwise than its image.
_INIT_FILES = frozenset(
    {".dockerenv", "etc/mtab", "etc/hostname", "etc/hosts", "etc/resolv.conf", "dev/console"}
)
_INIT_DIRS = frozenset({"dev", "dev/pts", "dev/shm", "etc", "proc", "sys"})


def exports_as_committed(upper: Path, over: Limit | None, *, init_layer: bool) -> bool:
    """Whether a stopped container whose layer directory is `upper` exports as the image it
    is committed as (with an `init_layer` above the image's, as Docker has: it changed none
    of what that masks, `_INIT_FILES`, and `_INIT_DIRS` but as 0755 root directories; Podman
    writes its own such files into the container's layer, which the commit keeps) and, with
    `over`, holds more than `over`: entries and the bytes of regular files (a hard-linked
    inode once) counted from the listing alone, an estimate of what write_upper_dir counts.
    False when it cannot be read."""
    budget = _Budget(over or Limit(data_bytes=1 << 62, entries=1 << 62))
    inodes: set[tuple[int, int]] = set()
    big = over is None
    try:
        for rel, st in _walk(upper, ""):
            if init_layer and (rel in _INIT_FILES or (rel in _INIT_DIRS and not _plain_dir(st))):
                return False
            ident = (st.st_dev, st.st_ino)
            regular = stat.S_ISREG(st.st_mode) and ident not in inodes
            inodes.add(ident)
            if not big:
                try:
                    budget.take(st.st_size if regular else 0)
                except TooLarge:
                    big = True
    except Unreadable:
        return False
    return big


def _plain_dir(st: os.stat_result) -> bool:
    return (
        stat.S_ISDIR(st.st_mode)
        and stat.S_IMODE(st.st_mode) == 0o755
        and st.st_uid == 0 == st.st_gid
    )


def _walk(top: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below `top`/`rel`, depth first."""
    try:
        names = os.listdir(top / rel if rel else top)
    except OSError as exc:
        raise Unreadable(f"cannot list {rel or '/'}: {exc}") from exc
    for name in names:
        child = f"{rel}/{name}" if rel else name
        try:
            st = os.lstat(top / child)
        except OSError as exc:
            raise Unreadable(f"cannot read {child}: {exc}") from exc
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(top, child)


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found: dict[str, bytes] = {}
    for key in names:
        with contextlib.suppress(OSError):
            found[key] = os.getxattr(path, key, follow_symlinks=False)
    return found


def normalise_layer(layer: BinaryIO, out: BinaryIO, limit: Limit) -> None:
    """Rewrite the layer tarball `layer` (seekable) into the normalised form on `out`.

    Raises TooLarge past `limit`, EngineError for a tarball that is not a layer."""
    budget = _Budget(limit)
    items: list[_Item] = []
    try:
        with tarfile.open(fileobj=layer, mode="r:") as tar:
            by_name: dict[str, tarfile.TarInfo] = {}
            for member in tar.getmembers():
                name = _clean(member.name)
                if name:
                    by_name[name] = member  # a later member of the same name wins, as tar does
            roots: dict[str, str] = {}  # hard link name -> the name that holds the content
            for name, member in by_name.items():
                if member.islnk():
                    target = _clean(member.linkname)
                    roots[name] = roots.get(target, target)
            for name, member in by_name.items():
                if name.rpartition("/")[2].startswith(WHITEOUT):
                    budget.take(0)
                    items.append(_marker(name))
                    continue
                holder = by_name.get(roots[name]) if member.islnk() else member
                if holder is None or (member.islnk() and not holder.isreg()):
                    raise EngineError(f"the image's layer links {name} to a missing file")
                info = _info(
                    name + "/" if holder.isdir() else name,
                    tarfile.REGTYPE if holder.type == tarfile.AREGTYPE else holder.type,
                    mode=stat.S_IMODE(holder.mode),
                    uid=holder.uid,
                    gid=holder.gid,
                )
                info.mtime = int(holder.mtime)
                info.pax_headers = _xattr_records(
                    {
                        key[len("SCHILY.xattr.") :]: value
                        for key, value in holder.pax_headers.items()
                        if key.startswith("SCHILY.xattr.")
                    }
                )
                item = _Item(name, info)
                if holder.issym():
                    info.linkname = holder.linkname
                elif holder.ischr() or holder.isblk():
                    info.devmajor, info.devminor = holder.devmajor, holder.devminor
                elif holder.isreg():
                    info.size = holder.size
                    budget.take(0 if member.islnk() else holder.size)
                    item.member = holder
                    linked = member.islnk() or name in roots.values()
                    item.inode = roots.get(name, name) if linked else None
                    items.append(item)
                    continue
                budget.take(0)
                items.append(item)
            _write(_finish(items), out, tar)
    except (tarfile.TarError, OSError) as exc:
        raise EngineError(f"the image's layer is not a readable tarball: {exc}") from exc


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise EngineError(f"the image's layer holds an unsafe name {name!r}")
    return "/".join(parts)


def _finish(items: list[_Item]) -> list[_Item]:
    """Sort by path, parents first ("a", "a/b", "a-b"), and make the first name of each inode
    hold the content, the later ones hard links to it."""
    items.sort(key=lambda item: tuple(item.name.split("/")))
    first: dict[object, str] = {}
    for item in items:
        if item.inode is None:
            continue
        if item.inode in first:
            item.info.type, item.info.linkname, item.info.size = (
                tarfile.LNKTYPE,
                first[item.inode],
                0,
            )
            item.source = item.data = item.member = None
        else:
            first[item.inode] = item.name
    return items


def _write(items: list[_Item], out: BinaryIO, layer: tarfile.TarFile | None = None) -> None:
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            if item.source is not None:
                with item.source.open("rb") as f:
                    tar.addfile(item.info, f)
            elif item.member is not None and layer is not None:
                tar.addfile(item.info, layer.extractfile(item.member))
            elif item.data is not None and item.info.isreg():
                tar.addfile(item.info, io.BytesIO(item.data))
            else:
                tar.addfile(item.info)
