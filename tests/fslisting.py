"""Listings to compare: a container's filesystem (from its export tarball) and an image's (the
kernel's view, through a read-only loop mount; ext4 through debugfs, no mount needed).

A listing maps every path to a `Node`: type, permission bits, owner, size, symlink target,
device numbers, xattrs, the content's sha256 and the set of names sharing its inode. Names are
`str` with undecodable bytes as surrogates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.cachefiles import export_blob
from tests.tarmembers import member_bytes

_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


@dataclass(frozen=True)
class Node:
    """One path as a filesystem holds it."""

    type: str
    mode: int  # permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    size: int = 0  # regular files only
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict, compare=True, hash=False)
    sha256: str | None = None
    mtime: int = field(default=0, compare=False)
    links: frozenset[str] = field(default_factory=frozenset)  # other names of the same inode

    def without(self, *names: str) -> Node:
        """A copy with the named fields reset to their defaults (for lossy types)."""
        defaults: dict[str, Any] = {  # each field's own type: checked by `replace` at run time
            "xattrs": {},
            "links": frozenset(),
            "rdev": None,
            "target": None,
            "sha256": None,
            "uid": 0,
            "gid": 0,
            "mode": 0,
            "size": 0,
            "mtime": 0,
        }
        return replace(self, **{n: defaults[n] for n in names})


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_export(export: Path) -> dict[str, Node]:
    """The container's filesystem as its export tarball describes it."""
    nodes: dict[str, Node] = {}
    groups: dict[str, set[str]] = {}
    with tarfile.open(export, errors="surrogateescape") as tar:
        for m in tar:
            path = "/" + m.name.strip("/") if m.name.strip("/.") else "/"
            xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            if m.islnk():
                target = "/" + m.linkname.strip("/")
                groups.setdefault(target, {target}).add(path)
                nodes[path] = replace(nodes[target])
                continue
            kind = (
                "dir"
                if m.isdir()
                else "file"
                if m.isreg()
                else "symlink"
                if m.issym()
                else "char"
                if m.ischr()
                else "block"
                if m.isblk()
                else "fifo"
            )
            data = member_bytes(tar, m) if m.isreg() else None
            nodes[path] = Node(
                type=kind,
                mode=m.mode & 0o7777,
                uid=m.uid,
                gid=m.gid,
                size=m.size if m.isreg() else 0,
                target=m.linkname if m.issym() else None,
                rdev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else None,
                xattrs=xattrs,
                sha256=_digest(data) if data is not None else None,
                mtime=int(m.mtime),
            )
    for names in groups.values():
        for name in names:
            nodes[name] = replace(nodes[name], links=frozenset(names - {name}))
    return nodes


def walk(root: Path) -> dict[str, Node]:
    """A mounted tree's listing (every path below `root`, "/" for root itself)."""
    nodes: dict[str, Node] = {}
    inodes: dict[int, set[str]] = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = base + rel if rel else base
        st = os.lstat(full)
        path = os.fsdecode(rel) or "/"
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        xattrs = {}
        with contextlib.suppress(OSError):
            for name in os.listxattr(full, follow_symlinks=False):
                xattrs[name] = os.getxattr(full, name, follow_symlinks=False)
        sha = None
        if kind == "file":
            sha = _digest(Path(os.fsdecode(full)).read_bytes())
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(path)
        nodes[path] = Node(
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else 0,
            target=os.fsdecode(os.readlink(full)) if kind == "symlink" else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
            if kind in ("char", "block")
            else None,
            xattrs=xattrs,
            sha256=sha,
            mtime=int(st.st_mtime),
        )
        if kind == "dir":
            stack.extend(rel + b"/" + name for name in os.listdir(full))
    for names in inodes.values():
        for name in names:
            nodes[name] = replace(nodes[name], links=frozenset(names - {name}))
    return nodes


@contextlib.contextmanager
def mounted(image: Path, fstype: str, options: str = "") -> Iterator[Path]:
    """Mount `image` read-only through a loop device (root only); always unmounted after."""
    with tempfile.TemporaryDirectory(prefix="rfs-test-mnt-") as mnt:
        opts = ",".join(["loop", "ro", *([options] if options else [])])
        subprocess.run(
            ["mount", "-t", fstype, "-o", opts, str(image), mnt], check=True, capture_output=True
        )
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)


def list_image(image: Path, fstype: str) -> dict[str, Node]:
    """The image's listing through a read-only loop mount (vfat: copied out with mtools, as
    kernels for microVMs often lack vfat)."""
    if fstype == "vfat":
        with tempfile.TemporaryDirectory(prefix="rfs-test-vfat-") as out:
            env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}
            subprocess.run(
                ["mcopy", "-s", "-n", "-m", "-i", str(image), "::/", out],
                check=True,
                capture_output=True,
                env=env,
            )
            return walk(Path(out))
    with mounted(image, fstype) as mnt:
        return walk(mnt)


# -- a container's listing against an image's ------------------------------------------

RESTORED = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")  # files rfs writes back


def container_listing(cache: Path) -> dict[str, Node]:
    """The container's listing, from the one export tarball in the cache, as rfs fixes it."""
    nodes = list_export(export_blob(cache))
    for path in [p for p in nodes if p == "/.dockerenv" or p.startswith("/.rfs")]:
        del nodes[path]
    nodes.setdefault("/", Node("dir", 0o755, 0, 0))  # exports have no entry for the root
    nodes["/dev/console"] = Node("char", 0o600, 0, 0, rdev=(5, 1))
    for path in RESTORED:  # written back by rfs, with a file's usual mode
        nodes[path] = replace(nodes[path], mode=0o644, size=0, sha256=None)
    return nodes


def comparable(nodes: dict[str, Node], fs_type: str) -> dict[str, Node]:
    """Reduce a listing to what `fs_type` holds (see each driver's module doc)."""
    out = {}
    for path, node in nodes.items():
        if path == "/lost+found" or path.startswith("/lost+found/"):
            continue
        if path in RESTORED:
            node = replace(node, size=0, sha256=None)
        if fs_type == "btrfs" and node.rdev is not None:
            node = replace(node, rdev=(0, 0))  # mkfs.btrfs --rootdir writes devices as 0,0
        if fs_type == "vfat":
            if node.type not in ("dir", "file") or "\udcff" in path:
                continue  # no symlinks, devices, FIFOs; a name that is not UTF-8 is mangled
            node = Node(node.type, 0, 0, 0, node.size, sha256=node.sha256)
        out[path] = node
    return out
