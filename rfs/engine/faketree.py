"""The file trees of the fake engine (rfs.engine.fake): entries, layers as tarballs of the
changes between two trees, and the context a fake command runs with."""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rfs.engine.base import RunSpec
from rfs.errors import EngineError


@dataclass(frozen=True)
class Entry:
    """One path of an image: a regular file, a directory or a symlink."""

    kind: str = "file"  # "file" | "dir" | "symlink"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlinks


Tree = dict[str, Entry]  # absolute path -> entry


@dataclass
class StoredImage:
    config: bytes  # its sha256 is the image ID
    layers: list[bytes]  # layer tarballs, base first
    tree: Tree
    size: int


@dataclass
class FakeRun:
    """What a command stand-in sees: its spec and the container's files, which it may change."""

    spec: RunSpec
    files: Tree
    output: list[bytes] = field(default_factory=list)

    @property
    def argv(self) -> tuple[str, ...]:
        """The command line."""
        return self.spec.argv

    def print(self, text: str) -> None:
        """Write `text` (and a newline) to the command's output."""
        self.output.append(text.encode() + b"\n")

    def write(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        """Create or replace the file `path` (parents are made)."""
        path = norm(path)
        make_parents(self.files, path)
        self.files[path] = Entry("file", data, mode, uid, gid)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Make directory `path` and its parents."""
        path = norm(path)
        make_parents(self.files, path)
        self.files.setdefault(path, Entry("dir", mode=mode))

    def read(self, path: str) -> bytes:
        """The content of file `path`; a mounted host file wins, as in a container."""
        path = norm(path)
        for mount in self.spec.mounts:
            inside = norm(mount.container_path)
            if path == inside or path.startswith(inside + "/"):
                host = mount.host_path + path[len(inside) :]
                with open(host, "rb") as f:
                    return f.read()
        return self.files[path].data

    def remove(self, path: str) -> None:
        """Remove `path` and everything below it."""
        path = norm(path)
        for name in [p for p in self.files if p == path or p.startswith(path + "/")]:
            del self.files[name]


Command = Callable[[FakeRun], int]


def norm(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/"))


def make_parents(files: Tree, path: str) -> None:
    parent = posixpath.dirname(path)
    while parent != "/" and parent not in files:
        files[parent] = Entry("dir", mode=0o755)
        parent = posixpath.dirname(parent)


def layer_tar(changes: Mapping[str, Entry | None]) -> bytes:
    """A layer tarball: changed entries, and whiteouts for removed paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(changes):
            entry = changes[path]
            name = path.lstrip("/")
            if entry is None:
                head, tail = posixpath.split(name)
                info = tarfile.TarInfo(posixpath.join(head, f".wh.{tail}"))
                tar.addfile(info, io.BytesIO(b""))
                continue
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, 0
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return buf.getvalue()


def apply_layer(tree: Tree, layer: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as tar:
        for info in tar:
            path = norm(info.name)
            head, tail = posixpath.split(path)
            if tail.startswith(".wh."):
                gone = posixpath.join(head, tail[4:])
                for name in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                    del tree[name]
                continue
            if info.isdir():
                tree[path] = Entry("dir", mode=info.mode, uid=info.uid, gid=info.gid)
            elif info.issym():
                tree[path] = Entry(
                    "symlink", mode=0o777, uid=info.uid, gid=info.gid, target=info.linkname
                )
            elif info.isfile():
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                tree[path] = Entry("file", data, info.mode, info.uid, info.gid)
            else:
                raise EngineError(f"the fake engine keeps no {info.type!r} entries ({path})")


def diff_trees(old: Tree, new: Tree) -> dict[str, Entry | None]:
    changes: dict[str, Entry | None] = {p: e for p, e in new.items() if old.get(p) != e}
    changes.update({p: None for p in old if p not in new})
    return changes


def env_of(pairs: object) -> dict[str, str]:
    """`NAME=value` strings (an image config's Env) as a dict."""
    if not isinstance(pairs, list | tuple):
        return {}
    return {k: v for k, _, v in (str(p).partition("=") for p in pairs)}


def copy_into(
    tree: Tree,
    args: Sequence[str],
    ctx: Tree,
    built: Mapping[str, tuple[Tree, dict[str, object], list[bytes]]],
    line: str,
) -> None:
    """COPY [--from=stage] src... dest: files by name, a directory's (or ".") content."""
    from rfs.engine.fakebuild import DockerfileError

    source = ctx
    words = list(args)
    if words and words[0].startswith("--from="):
        name = words.pop(0).split("=", 1)[1]
        if name not in built:
            raise DockerfileError(line, f"no stage {name} to copy from")
        source = built[name][0]
    if len(words) < 2:
        raise DockerfileError(line, "COPY needs a source and a destination")
    *sources, dest = words
    for src in sources:
        path = norm(src)
        if path not in source and path != "/":
            raise DockerfileError(line, f"{src}: not found in the build context")
        if path == "/" or source[path].kind == "dir":
            prefix = "" if path == "/" else path
            for name, entry in source.items():
                if name.startswith(prefix + "/"):
                    target = norm(dest + "/" + name[len(prefix) + 1 :])
                    make_parents(tree, target)
                    tree[target] = entry
            continue
        target = norm(dest)
        if dest.endswith("/") or tree.get(target, Entry()).kind == "dir":
            target = norm(posixpath.join(dest, posixpath.basename(path)))
        make_parents(tree, target)
        tree[target] = source[path]


def tar_of(members: Mapping[str, bytes]) -> bytes:
    """A tarball of regular files, by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
