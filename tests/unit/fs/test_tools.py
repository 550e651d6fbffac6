"""Tool versions are remembered against the tools' files and asked again when those change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from rfs.fs import squashfs
from rfs.fs.tools import remembered_tool_version
from rfs.script.model import FsType


def _tool(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / "tar2sqfs"
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(0o755)
    return path


def test_version_is_asked_once_per_tool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    tool = _tool(tmp_path, "echo 'tar2sqfs (fake) 1.0'")
    memo: dict[str, Any] = {}
    squashfs.mkfs_version.cache_clear()  # another test may have asked the real tool
    assert remembered_tool_version(FsType.SQUASHFS, memo) == "tar2sqfs (fake) 1.0"
    st = tool.stat()
    # Same size and mtime, and the same inode: the file counts as unchanged, so the tool is
    # not run again (this one would fail if it were).
    tool.write_text("#!/bin/sh\nexit 1 #######################\n"[: st.st_size])
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tool.stat().st_size == st.st_size
    assert remembered_tool_version(FsType.SQUASHFS, memo) == "tar2sqfs (fake) 1.0"
    # An upgrade replaces the file (as dpkg does: a new file renamed over it): asked again.
    new = _tool(tmp_path / "new", "echo 'tar2sqfs (fake) 2.0.1'")
    new.replace(tool)
    squashfs.mkfs_version.cache_clear()  # as a new rfs process would start
    assert remembered_tool_version(FsType.SQUASHFS, memo) == "tar2sqfs (fake) 2.0.1"
