"""The operations an ext4 patch is made of, and the debugfs commands that perform them.

A Patch is an ordered list of operations (rfs.fs.treediff decides them and their order):
removals first, children before their directory (`rmdir` wants an empty directory; `rm`
drops one link and frees the inode with its last), then the tree in path order, parents
first: new inodes, new names for existing ones (`ln`, which leaves the link count alone, so
`Links` sets it afterwards), owners, modes, times and xattrs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from rfs.host.hashing import digest_bytes, digest_json

# debugfs reads its commands through libss, which splits on blanks and honours double quotes
# but has no escapes: names with a quote, a backslash, a control character or bytes that are
# not UTF-8 cannot be written, so such patches take the full route.
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]|[\udc80-\udcff]')
_S_IF = {
    "file": 0o100000,
    "dir": 0o040000,
    "symlink": 0o120000,
    "char": 0o020000,
    "block": 0o060000,
    "fifo": 0o010000,
}


@dataclass(frozen=True)
class Extent:
    """File content that sits in a file (an archive's member data): `size` bytes at `offset`."""

    file: Path
    offset: int
    size: int

    def read(self) -> bytes:
        """The content."""
        with self.file.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


Content = bytes | Extent


def unsafe(name: str) -> bool:
    """Whether debugfs cannot be given `name` (see _UNSAFE)."""
    return _UNSAFE.search(name) is not None


@dataclass(frozen=True)
class Remove:
    """Unlink a non-directory (its inode goes with its last name)."""

    path: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries (checked with `unsafe`)."""
        return (self.path,)


@dataclass(frozen=True)
class RemoveDir:
    """Remove an empty directory."""

    path: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class Write:
    """A new regular file holding `content`."""

    path: str
    content: Content

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class MakeDir:
    """A new directory."""

    path: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class Symlink:
    """A new symbolic link."""

    path: str
    target: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path, self.target)


@dataclass(frozen=True)
class MakeNode:
    """A new character or block device or FIFO."""

    path: str
    kind: str  # "char", "block" or "fifo"
    device: tuple[int, int] = (0, 0)

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class AddName:
    """A new name `path` for the inode `source` names (a hard link)."""

    path: str
    source: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path, self.source)


@dataclass(frozen=True)
class Links:
    """Set the link count of the inode `path` names."""

    path: str
    count: int

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class Fields:
    """Set an inode's mode, owner and times; for a `new` one also its crtime, the build's
    time (as mke2fs sets it)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    atime: int = 0
    ctime: int = 0
    new: bool = False

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path,)


@dataclass(frozen=True)
class SetXattr:
    """Set the extended attribute `name` of `path` to `value`."""

    path: str
    name: str
    value: bytes

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path, self.name)


@dataclass(frozen=True)
class RemoveXattr:
    """Remove the extended attribute `name` of `path`."""

    path: str
    name: str

    def names(self) -> tuple[str, ...]:
        """The strings the command carries."""
        return (self.path, self.name)


Op = (
    Remove
    | RemoveDir
    | Write
    | MakeDir
    | Symlink
    | MakeNode
    | AddName
    | Links
    | Fields
    | SetXattr
    | RemoveXattr
)


@dataclass
class Patch:
    """What turns one image's tree into another's, in the order debugfs must do it."""

    ops: list[Op] = field(default_factory=list)
    missing_includes: list[str] = field(default_factory=list)  # as the stream would report


def _write_content(content: Content, dest: Path) -> None:
    if isinstance(content, bytes):
        dest.write_bytes(content)
        return
    with content.file.open("rb") as src, dest.open("wb") as out:
        src.seek(content.offset)
        left = content.size
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"{content.file} ends before the content it should hold")
            out.write(chunk)
            left -= len(chunk)


def commands(patch: Patch, files: Path, epoch: int) -> list[str]:
    """The debugfs script of `patch`; file contents and xattr values go to `files` first.
    `epoch` is the build's timestamp (a new inode's crtime, as mke2fs sets it)."""
    lines: list[str] = []
    for number, op in enumerate(patch.ops):
        if isinstance(op, Remove):
            lines.append(f'rm "{op.path}"')
        elif isinstance(op, RemoveDir):
            lines.append(f'rmdir "{op.path}"')
        elif isinstance(op, Write):
            source = files / str(number)
            _write_content(op.content, source)
            lines.append(f'write "{source}" "{op.path}"')
        elif isinstance(op, MakeDir):
            lines.append(f'mkdir "{op.path}"')
        elif isinstance(op, Symlink):
            lines.append(f'symlink "{op.path}" "{op.target}"')
        elif isinstance(op, MakeNode):
            lines.extend(_mknod(op))
        elif isinstance(op, AddName):
            lines.append(f'ln "{op.source}" "{op.path}"')
        elif isinstance(op, Links):
            lines.append(f'sif "{op.path}" links_count {op.count}')
        elif isinstance(op, Fields):
            lines.extend(_fields(op, epoch))
        elif isinstance(op, SetXattr):
            source = files / f"{number}.xattr"
            source.write_bytes(op.value)
            lines.append(f'ea_set -f "{source}" "{op.path}" "{op.name}"')
        else:
            lines.append(f'ea_rm "{op.path}" "{op.name}"')
    return lines


def _mknod(op: MakeNode) -> list[str]:
    """debugfs's mknod takes a name in the current directory (not a path) and device numbers
    below 65536: make the node with 0 0 and write the numbers as mke2fs encodes them."""
    parent, name = op.path.rsplit("/", 1)
    if op.kind == "fifo":
        return [f'cd "{parent or "/"}"', f'mknod "{name}" p', "cd /"]
    major, minor = op.device
    if major < 256 and minor < 256:
        old, new = major * 256 + minor, 0
    else:
        old, new = 0, ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF
    kind = "c" if op.kind == "char" else "b"
    return [
        f'cd "{parent or "/"}"',
        f'mknod "{name}" {kind} 0 0',
        "cd /",
        f'sif "{op.path}" block[0] {old}',
        f'sif "{op.path}" block[1] {new}',
    ]


def _fields(op: Fields, epoch: int) -> list[str]:
    path = op.path
    lines = [
        f'sif "{path}" mode 0{_S_IF[op.kind] | op.mode:o}',
        f'sif "{path}" uid {op.uid}',
        f'sif "{path}" gid {op.gid}',
        f'sif "{path}" mtime @{op.mtime}',
        f'sif "{path}" atime @{op.atime}',
        f'sif "{path}" ctime @{op.ctime}',
    ]
    if op.new:
        lines.append(f'sif "{path}" crtime @{epoch}')
    return lines


def digest(patch: Patch, **extra: object) -> str:
    """What identifies the bytes the patch writes (file contents by their digest)."""
    ops: list[object] = []
    for op in patch.ops:
        fields = dict(vars(op))
        if isinstance(op, Write):
            content = op.content
            if not isinstance(content, bytes):
                with content.file.open("rb") as f:
                    f.seek(content.offset)
                    content = f.read(content.size)
            fields["content"] = digest_bytes(content)
        elif isinstance(op, SetXattr):
            fields["value"] = op.value.hex()
        ops.append([type(op).__name__, fields])
    return digest_json({"ops": ops, **extra})
