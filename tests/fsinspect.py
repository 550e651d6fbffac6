"""List an ext4 image's tree without mounting it, through `debugfs` (read-only).

One debugfs process per directory level walks the tree (`ls -p` by inode number, so no name is
ever quoted), then one more stats every inode. Names and symlink targets are `str` with
undecodable bytes as surrogates (`os.fsdecode` style), so `"x\\udcffy"` is the name b"x\\xffy".
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rfs.host import proc

_TYPES = {
    0o040000: "dir",
    0o100000: "file",
    0o120000: "symlink",
    0o020000: "char",
    0o060000: "block",
    0o010000: "fifo",
    0o140000: "socket",
}
_PROMPT = re.compile(rb"^debugfs: (\w+)(?: -\w+)* <(\d+)>.*$", re.M)


@dataclass(frozen=True)
class Entry:
    """One path in the image, as debugfs sees it."""

    path: str
    type: str  # "file", "dir", "symlink", "char", "block", "fifo" or "socket"
    mode: int  # permission bits including setuid, setgid and sticky
    uid: int
    gid: int
    size: int
    inode: int  # equal inode numbers: hard links
    links: int = 0
    mtime: int = 0
    target: str | None = None  # symlink target
    major: int | None = None  # device numbers
    minor: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _debugfs(image: Path, commands: list[str]) -> bytes:
    """Run debugfs commands in one process; debugfs echoes each as a `debugfs: CMD` line."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        result = proc.run([proc.tool_path("debugfs"), "-f", script.name, str(image)])
    return result.stdout


def _sections(output: bytes) -> dict[tuple[str, int], bytes]:
    """Split debugfs -f output into {(command, inode): output} sections."""
    found: dict[tuple[str, int], bytes] = {}
    marks = list(_PROMPT.finditer(output))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(output)
        found[(mark.group(1).decode(), int(mark.group(2)))] = output[mark.end() + 1 : end]
    return found


def _listing(image: Path) -> dict[str, tuple[int, int]]:
    """Map every path to (inode, full mode) by walking directories level by level."""
    found: dict[str, tuple[int, int]] = {"/": (2, 0o040755)}
    level = {2: "/"}
    while level:
        sections = _sections(_debugfs(image, [f"ls -p <{ino}>" for ino in level]))
        next_level: dict[int, str] = {}
        for ino, base in level.items():
            for line in sections.get(("ls", ino), b"").splitlines():
                parts = line.split(b"/")
                if len(parts) != 8 or parts[5] in (b"", b".", b"..") or parts[1] == b"0":
                    continue
                child, mode = int(parts[1]), int(parts[2], 8)
                path = base.rstrip("/") + "/" + os.fsdecode(parts[5])
                found[path] = (child, mode)
                if mode & 0o170000 == 0o040000:
                    next_level[child] = path
        level = next_level
    return found


def _field(pattern: bytes, text: bytes) -> bytes | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _xattrs(text: bytes) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    block = text.split(b"Extended attributes:\n", 1)
    if len(block) < 2:
        return found
    for line in block[1].splitlines():
        match = re.match(rb"^  (\S+) \((\d+)\)(?: = (.*))?$", line)
        if match is None:
            break
        value = (match.group(3) or b"").strip()
        if value.startswith(b'"'):
            found[match.group(1).decode()] = value[1:-1]
        else:
            found[match.group(1).decode()] = bytes.fromhex(value.decode())
    return found


def list_ext4(image: Path) -> dict[str, Entry]:
    """Return every path in the image ("/" included) with its metadata; lost+found too."""
    listing = _listing(image)
    inodes = sorted({ino for ino, _ in listing.values()})
    stats = _sections(_debugfs(image, [f"stat <{ino}>" for ino in inodes]))
    modes = dict(listing.values())
    symlinks = [ino for ino in inodes if modes[ino] & 0o170000 == 0o120000]
    targets = _symlink_targets(image, symlinks, stats)
    entries: dict[str, Entry] = {}
    for path, (ino, mode) in sorted(listing.items()):
        text = stats[("stat", ino)]
        kind = _TYPES.get(mode & 0o170000, "unknown")
        major = minor = None
        device = _field(rb"Device major/minor number: (\d+:\d+)", text)
        if device is not None:
            major, minor = (int(n) for n in device.split(b":"))
        entries[path] = Entry(
            path=path,
            type=kind,
            mode=mode & 0o7777,
            uid=int(_field(rb"User:\s+(-?\d+)", text) or 0) & 0xFFFFFFFF,
            gid=int(_field(rb"Group:\s+(-?\d+)", text) or 0) & 0xFFFFFFFF,
            size=int(_field(rb"Size: (\d+)", text) or 0),
            inode=ino,
            links=int(_field(rb"Links: (\d+)", text) or 0),
            mtime=int(_field(rb" mtime: 0x([0-9a-f]+)", text) or b"0", 16),
            target=targets.get(ino),
            major=major,
            minor=minor,
            xattrs=_xattrs(text),
        )
    return entries


def _symlink_targets(
    image: Path, inodes: list[int], stats: dict[tuple[str, int], bytes]
) -> dict[int, str]:
    targets: dict[int, str] = {}
    slow: list[int] = []
    for ino in inodes:
        fast = re.search(rb'Fast link dest: "(.*)"', stats[("stat", ino)])
        if fast is not None:
            targets[ino] = os.fsdecode(fast.group(1))
        else:
            slow.append(ino)
    if slow:
        with tempfile.TemporaryDirectory() as tmp:
            _debugfs(image, [f"dump <{ino}> {tmp}/{ino}" for ino in slow])
            for ino in slow:
                targets[ino] = os.fsdecode(Path(tmp, str(ino)).read_bytes())
    return targets


def read_ext4_file(image: Path, inode: int) -> bytes:
    """Return the content of a file in the image, by inode number (see Entry.inode)."""
    with tempfile.TemporaryDirectory() as tmp:
        _debugfs(image, [f"dump <{inode}> {tmp}/out"])
        return Path(tmp, "out").read_bytes()


# `stat` lines that hold where an inode is, not what it is: they differ between two images of
# the same tree made in different orders.
_PLACEMENT = re.compile(
    rb"^(Inode: \d+\s+|Inode checksum:.*|EXTENTS:|\(\d.*|Generation:.*|.*Blockcount: \d+)"
)


def inode_details(image: Path) -> dict[str, bytes]:
    """Every path's `debugfs stat` text without what depends on placement (inode and block
    numbers, checksums): equal for the same tree whichever way the image was made."""
    listing = _listing(image)
    inodes = sorted({ino for ino, _ in listing.values()})
    stats = _sections(_debugfs(image, [f"stat <{ino}>" for ino in inodes]))
    details: dict[str, bytes] = {}
    for path, (ino, _) in listing.items():
        text = stats[("stat", ino)]
        text = re.sub(rb"^Inode: \d+\s+", b"", text, flags=re.M)
        text = re.sub(rb"Blockcount: \d+|File ACL: \d+", b"", text)
        kept = [line for line in text.splitlines() if not _PLACEMENT.match(line)]
        details[path] = b"\n".join(kept)
    return details


def link_groups(image: Path) -> set[frozenset[str]]:
    """The sets of paths that share an inode (hard links), each with more than one path."""
    by_inode: dict[int, set[str]] = {}
    for path, (ino, mode) in _listing(image).items():
        if mode & 0o170000 != 0o040000:
            by_inode.setdefault(ino, set()).add(path)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def _contents(image: Path) -> dict[str, bytes]:
    return {
        path: read_ext4_file(image, entry.inode)
        for path, entry in list_ext4(image).items()
        if entry.type in ("file", "symlink")
    }


def assert_same_tree(full: Path, patched: Path) -> None:
    """Assert that two ext4 images hold the same tree: every inode field but placement, the
    hard-link groups and every file's bytes; and that `patched` passes `e2fsck -fn`."""
    expected, got = inode_details(full), inode_details(patched)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path] == expected[path], path
    assert link_groups(patched) == link_groups(full)
    assert _contents(patched) == _contents(full)
    subprocess.run(["e2fsck", "-fn", str(patched)], check=True, capture_output=True)
