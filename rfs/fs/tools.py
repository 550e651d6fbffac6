"""The tools behind each filesystem type, and their versions remembered between builds.

The tool's version is part of the assemble key, so every build needs it; asking the tool
(`mke2fs -V`) costs a process and importing the driver, which an up-to-date build does not
otherwise need. The version is remembered against the identity of the tools' files (path,
size, mtime, inode): upgrading a tool changes that, and the next build asks again.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from rfs.host import proc
from rfs.script.model import FsType

# Every program whose version the driver's `mkfs_version` reads or whose presence it needs.
TOOLS: dict[FsType, tuple[str, ...]] = {
    FsType.EXT4: ("mke2fs", "debugfs"),
    FsType.SQUASHFS: ("tar2sqfs",),
    FsType.EROFS: ("mkfs.erofs", "fakeroot"),
    FsType.BTRFS: ("mkfs.btrfs", "fakeroot"),
    FsType.VFAT: ("mkfs.vfat", "mcopy"),
    FsType.XFS: ("mkfs.xfs",),
}


def _identity(names: tuple[str, ...]) -> list[list[Any]]:
    found = []
    for name in names:
        path = os.path.realpath(proc.tool_path(name))  # raises if it is not installed
        st = os.stat(path)
        found.append([path, st.st_size, st.st_mtime_ns, st.st_ino])
    return found


def remembered_tool_version(fs_type: FsType, memo: MutableMapping[str, Any]) -> str:
    """The version of the tools that make `fs_type` images, from `memo` when the tools' files
    are unchanged, else asked from the tools (and `memo` updated)."""
    identity = _identity(TOOLS[fs_type])
    known = memo.get(fs_type.value)
    if isinstance(known, dict) and known.get("tools") == identity:
        return str(known["version"])
    from rfs.fs.assemble import tool_version

    version = tool_version(fs_type, fresh=True)
    memo[fs_type.value] = {"tools": identity, "version": version}
    return version
