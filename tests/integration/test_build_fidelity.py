"""A build script creates every kind of metadata; the image built by `rfs build` keeps it all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fsinspect import Entry, list_ext4, read_ext4_file
from tests.integration.conftest import CAP_NET_RAW
from tests.packages import FIDELITY_SCRIPT, write_package
from tests.rfsrun import rfs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tree(
    tmp_path_factory: pytest.TempPathFactory, caps_image: str, engine_toml: str
) -> tuple[Path, dict[str, Entry]]:
    # Built once per engine: the tests below only read the image.
    tmp_path = tmp_path_factory.mktemp("fidelity")
    name, tag = caps_image.split(":")
    # Podman's default capabilities lack MKNOD, which the script needs; Docker's include it.
    pkg = write_package(
        tmp_path / "pkg",
        f'[filesystem]\nsize_mib = 32\n[container]\nimage = {{ name = "{name}", tag = "{tag}" }}\n'
        f'{engine_toml}cap_add = ["MKNOD"]\n'
        f"[[commands]]\nscript_inline = '''{FIDELITY_SCRIPT}'''\n",
    )
    out = tmp_path / "fid.ext4"
    built = rfs("build", pkg, "-o", out, cache=tmp_path / "cache", timeout_s=600)
    assert built.code == 0, built.err
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return out, list_ext4(out)


def test_owners_modes_and_special_files(tree: tuple[Path, dict[str, Entry]]) -> None:
    _, t = tree
    expect = {
        "/fid/owned": ("file", 0o644, 1234, 5678),
        "/fid/owned-big": ("file", 0o644, 4000000000, 4000000001),
        "/fid/suid": ("file", 0o4755, 0, 0),
        "/fid/sgid": ("dir", 0o2775, 0, 0),
        "/fid/sticky": ("dir", 0o1777, 0, 0),
        "/fid/zero": ("file", 0o000, 0, 0),
        "/fid/fifo": ("fifo", 0o644, 0, 0),
        "/tmp": ("dir", 0o1777, 0, 0),
    }
    for path, (kind, mode, uid, gid) in expect.items():
        e = t[path]
        assert (e.type, e.mode & 0o7777, e.uid, e.gid) == (kind, mode, uid, gid), path


def test_links_devices_names(tree: tuple[Path, dict[str, Entry]]) -> None:
    image, t = tree
    assert t["/fid/link"].type == "symlink" and t["/fid/link"].target == "owned"
    assert t["/fid/hard1"].inode == t["/fid/hard2"].inode
    assert read_ext4_file(image, t["/fid/hard2"].inode) == b"hl\n"
    assert (t["/fid/chr"].type, t["/fid/chr"].major, t["/fid/chr"].minor) == ("char", 1, 3)
    assert (t["/fid/blk"].type, t["/fid/blk"].major, t["/fid/blk"].minor) == ("block", 7, 0)
    assert read_ext4_file(image, t["/fid/café"].inode) == b"bytes\n"
    assert "/.dockerenv" not in t and "/.rfs" not in t


def test_dev_console_is_a_char_device(tree: tuple[Path, dict[str, Entry]]) -> None:
    # Docker exports an empty /dev/console file, which the filter turns into char 5,1; Podman
    # exports none at all, and the filter adds one wherever /dev exists.
    _, t = tree
    console = t["/dev/console"]
    assert (console.type, console.major, console.minor) == ("char", 5, 1)


def test_capability_xattr_survives(tree: tuple[Path, dict[str, Entry]]) -> None:
    _, t = tree
    assert t["/usr/bin/capped"].xattrs.get("security.capability") == CAP_NET_RAW


def test_what_a_command_writes_to_etc_hosts_is_kept(tree: tuple[Path, dict[str, Entry]]) -> None:
    image, t = tree
    assert read_ext4_file(image, t["/etc/hosts"].inode) == b"127.0.0.1 localhost fidelity\n"
