"""Stage the filtered stream as a directory for mkfs tools that read one (mkfs.erofs 1.5,
mkfs.btrfs --rootdir, mtools), without root.

A non-root user cannot chown, mknod or set `security.*` xattrs, and Python's tarfile
extraction drops xattrs and special bits anyway (see /work/shared/ASSEMBLY.md). So the staging
tree holds only what the mkfs reads as data: file contents, directories, symlinks, hard links
and FIFOs, all with plain modes the user can read. Everything else (the archive's owners, every
mode bit, device numbers, xattrs) is recorded per inode and handed to the mkfs through
fakeroot: a state file (`fakeroot -i`) in faked's own format gives each inode its owner, mode
and device number, and xattrs are set inside the same fakeroot session just before the mkfs
starts (faked keeps them; the files never carry them). Running fakeroot over GNU tar instead
fails here (it cannot read mode-0000 files and damages files with capabilities); this way the
real files stay readable and fakeroot only answers stat and getxattr calls.

The same route is used as root: one route, one set of results, and it leaves no root-owned
setuid files lying around in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from rfs.errors import EnvironmentProblem
from rfs.fs import tarformat as tf
from rfs.host import proc

_CHUNK = 1 << 20
_XATTR_PREFIX = "SCHILY.xattr."
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@dataclass
class Meta:
    """What the image must say about one inode (the staged file says only its content)."""

    mode: int  # full st_mode: type and permission bits
    uid: int
    gid: int
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Inventory:
    """What the tree holds that some filesystem types cannot: paths per kind, for warnings."""

    owned: list[str] = field(default_factory=list)  # not root:root
    special: list[str] = field(default_factory=list)  # setuid, setgid or sticky
    devices: list[str] = field(default_factory=list)
    fifos: list[str] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    hardlinks: list[str] = field(default_factory=list)  # the second and later names
    xattrs: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every path, for name checks


@dataclass
class Staged:
    """A staged tree: the directory, per-path metadata, and what it holds."""

    root: Path
    meta: dict[str, Meta]  # relative path ("" for the root) -> metadata of its inode
    inventory: Inventory


def _relative(name: str) -> str:
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise tf.TarError(f"the image stream holds an unsafe path {name!r}")
    return "/".join(parts)


def _fs(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _clear(target: bytes) -> None:
    """Remove whatever is at `target` (a later entry replaces an earlier one)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(target)
    else:
        os.unlink(target)


def extract(stream: BinaryIO, root: Path, *, clamp_mtime: int, plain: bool = False) -> Staged:
    """Write the tar `stream` under `root` (an empty directory) as described in the module doc.

    With `plain` (vfat), only directories and regular files are written (hard links as
    copies); symlinks, devices and FIFOs are only counted in the inventory. Every mtime is
    clamped to `clamp_mtime`.
    """
    base = os.fsencode(root)
    meta: dict[str, Meta] = {"": Meta(stat.S_IFDIR | 0o755, 0, 0)}
    inv = Inventory()
    symlinks: set[str] = set()
    mtimes: dict[str, int] = {"": clamp_mtime}
    try:
        archive = tarfile.open(  # noqa: SIM115 (closed by the `with` below)
            fileobj=stream, mode="r|", errors="surrogateescape"
        )
    except tarfile.TarError as exc:
        raise tf.TarError(f"cannot read the image stream: {exc}") from exc
    with archive:
        for member in archive:
            rel = _relative(member.name)
            parent = rel.rpartition("/")[0]
            if any(p in symlinks for p in _ancestors_and(parent)):
                raise tf.TarError(f"the image stream writes {rel!r} through a symlink")
            target = base + b"/" + _fs(rel) if rel else base
            perm = member.mode & 0o7777
            xattrs = {
                k[len(_XATTR_PREFIX) :]: v.encode("utf-8", "surrogateescape")
                for k, v in member.pax_headers.items()
                if k.startswith(_XATTR_PREFIX)
            }
            _note(inv, "/" + rel, member, perm, xattrs)
            mtimes[rel] = min(int(member.mtime), clamp_mtime)
            if member.isdir():
                if rel:
                    with contextlib.suppress(FileExistsError):
                        if not os.path.isdir(target) or os.path.islink(target):
                            _clear(target)
                        os.mkdir(target, 0o755)
                symlinks.discard(rel)
                meta[rel] = Meta(stat.S_IFDIR | perm, member.uid, member.gid, xattrs=xattrs)
                continue
            if not rel:
                raise tf.TarError("the image stream holds a non-directory at the root")
            _clear(target)
            symlinks.discard(rel)
            meta.pop(rel, None)
            if member.islnk():
                source = base + b"/" + _fs(_relative(member.linkname))
                if not plain or os.path.isfile(source):  # vfat: mtools copies both names
                    os.link(source, target, follow_symlinks=False)
                continue
            if member.issym():
                if not plain:
                    os.symlink(_fs(member.linkname), target)
                    symlinks.add(rel)
                    meta[rel] = Meta(stat.S_IFLNK | 0o777, member.uid, member.gid)
                continue
            if member.ischr() or member.isblk():
                if not plain:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    rdev = os.makedev(member.devmajor, member.devminor)
                    meta[rel] = Meta(kind | perm, member.uid, member.gid, rdev, xattrs)
                continue
            if member.isfifo():
                if not plain:
                    os.mkfifo(target, 0o644)
                    meta[rel] = Meta(stat.S_IFIFO | perm, member.uid, member.gid, xattrs=xattrs)
                continue
            if not member.isreg():
                raise tf.TarError(f"the image stream holds {rel!r} of an unknown type")
            _write(archive, member, target)
            meta[rel] = Meta(stat.S_IFREG | perm, member.uid, member.gid, xattrs=xattrs)
    # Times last, directories deepest first: writing a child changes its parent's mtime.
    for rel in sorted(mtimes, key=lambda p: p.count("/"), reverse=True):
        path = base + b"/" + _fs(rel) if rel else base
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, (mtimes[rel], mtimes[rel]), follow_symlinks=False)
    return Staged(root, meta, inv)


def _ancestors_and(path: str) -> Iterator[str]:
    parts = path.split("/") if path else []
    for depth in range(1, len(parts) + 1):
        yield "/".join(parts[:depth])


def _write(archive: tarfile.TarFile, member: tarfile.TarInfo, target: bytes) -> None:
    data = archive.extractfile(member)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "wb", closefd=True) as out:
        if data is not None:
            shutil.copyfileobj(data, out, _CHUNK)


def _note(
    inv: Inventory, path: str, member: tarfile.TarInfo, perm: int, xattrs: dict[str, bytes]
) -> None:
    inv.names.append(path)
    if member.islnk():
        inv.hardlinks.append(path)
        return
    if member.uid or member.gid:
        inv.owned.append(path)
    if perm & _SPECIAL_BITS:
        inv.special.append(path)
    if member.ischr() or member.isblk():
        inv.devices.append(path)
    elif member.isfifo():
        inv.fifos.append(path)
    elif member.issym():
        inv.symlinks.append(path)
    if xattrs:
        inv.xattrs.append(path)


def write_state(staged: Staged, state: Path) -> None:
    """Write faked's state file: per inode, the owner, mode and device number it must show."""
    base = os.fsencode(staged.root)
    lines = []
    for rel, m in sorted(staged.meta.items()):
        st = os.lstat(base + b"/" + _fs(rel) if rel else base)
        lines.append(
            f"dev={st.st_dev:x},ino={st.st_ino},mode={m.mode:o},uid={m.uid},gid={m.gid},"
            f"nlink={st.st_nlink},rdev={m.rdev}\n"
        )
    state.write_text("".join(lines))


# Runs inside fakeroot: set the recorded xattrs (faked keeps them), then become the mkfs.
_SETTER = """
import os, sys
with open(sys.argv[1], "rb") as f:
    for line in f.read().split(b"\\n"):
        if line:
            path, name, value = line.split(b"\\0")
            os.setxattr(bytes.fromhex(path.decode()), name, bytes.fromhex(value.decode()),
                        follow_symlinks=False)
os.execv(sys.argv[2], sys.argv[2:])
"""


@dataclass
class Fakeroot:
    """The argv prefix that runs a tool under fakeroot with a staged tree's metadata."""

    state: Path
    xattrs: Path

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv`, run by fakeroot with the staged owners, modes, devices and xattrs."""
        return [
            proc.tool_path("fakeroot"),
            "-i",
            str(self.state),
            "--",
            sys.executable,
            "-I",
            "-S",
            "-c",
            _SETTER,
            str(self.xattrs),
            *argv,
        ]


@contextlib.contextmanager
def fakeroot_for(staged: Staged) -> Iterator[Fakeroot]:
    """Write the fakeroot state and xattr list for `staged`; removed after the block."""
    proc.tool_path("fakeroot")  # fail early, with the hint, when it is missing
    with tempfile.TemporaryDirectory(prefix="rfs-fakeroot-") as tmp:
        state = Path(tmp, "state")
        write_state(staged, state)
        xattrs = Path(tmp, "xattrs")
        base = os.fsencode(staged.root)
        with xattrs.open("wb") as f:
            for rel, m in sorted(staged.meta.items()):
                path = base + b"/" + _fs(rel) if rel else base
                for name, value in sorted(m.xattrs.items()):
                    f.write(
                        path.hex().encode()
                        + b"\0"
                        + name.encode()
                        + b"\0"
                        + value.hex().encode()
                        + b"\n"
                    )
        yield Fakeroot(state, xattrs)


# Where staged trees go: RAM when it has room (staging is write-once, read-once, and a disk's
# writeback made it 3-6 times slower on the test machines), else next to the output.
SHM = Path("/dev/shm")
STAGING_ENV = "RFS_STAGING_DIR"


def staging_parent(output: Path, content_bytes: int) -> Path:
    """The directory to stage in: $RFS_STAGING_DIR, else /dev/shm if it has twice the
    content's size free, else the output's directory."""
    chosen = os.environ.get(STAGING_ENV)
    if chosen:
        return Path(chosen)
    with contextlib.suppress(OSError):
        st = os.statvfs(SHM)
        if os.access(SHM, os.W_OK) and st.f_bavail * st.f_frsize > 2 * content_bytes + (64 << 20):
            return SHM
    return output.parent


@contextlib.contextmanager
def staging_dir(output: Path, content_bytes: int) -> Iterator[Path]:
    """An empty directory to stage a tree of `content_bytes` in (see `staging_parent`), removed
    with everything in it after the block."""
    parent = staging_parent(output, content_bytes)
    try:
        path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.rfs-stage-"))
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create a staging directory in {parent}: {exc}") from exc
    try:
        path.chmod(0o755)
        yield path
    finally:
        # Staged files and directories are the user's own and writable: rmtree suffices.
        shutil.rmtree(path, ignore_errors=True)
