"""Removing what killed builds left: read-only trees go, and nothing outside the tree changes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rfs.host.orphans import remove_orphans, remove_tree


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_read_only_tree_is_removed_and_its_parent_keeps_its_mode(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777)  # like /tmp
    tree = parent / "rfs-step-1-x"
    (tree / "ro" / "deeper").mkdir(parents=True)
    (tree / "ro" / "deeper" / "file").write_text("x")
    (tree / "ro" / "deeper").chmod(0o500)
    (tree / "ro").chmod(0o500)
    remove_tree(tree)
    assert not tree.exists()
    assert mode(parent) == 0o1777


def test_a_tree_someone_else_removed_first_leaves_the_parent_alone(tmp_path: Path) -> None:
    """Several rfs processes may clean up the same leftover at once: the one that finds it
    gone must not touch the directory holding it (it once made /tmp 0700, which locked
    every other user out of /tmp)."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    remove_tree(parent / "rfs-step-1-gone")
    assert mode(parent) == 0o1777


def test_leftovers_of_dead_processes_go_those_of_live_ones_stay(tmp_path: Path) -> None:
    dead = tmp_path / f"rfs-step-{2**22 + 12345}-a"  # above pid_max's default: no such process
    alive = tmp_path / f"rfs-step-{os.getpid()}-b"
    for path in (dead, alive):
        path.mkdir()
    tmp_path.chmod(0o1777)
    assert remove_orphans(tmp_path, "rfs-step-") == [dead]
    assert alive.exists() and not dead.exists()
    assert mode(tmp_path) == 0o1777
