"""#16: what a late command changed is laid on the cached export as a layer diff, never a new
export of the whole container; whatever it changed reaches the image exactly, and a warm build
gives the bytes of a clean build."""

from __future__ import annotations

import filecmp
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.fsinspect import link_groups, list_ext4, read_ext4_file
from tests.packages import build_toml, write_package
from tests.rfsrun import Rfs

pytestmark = pytest.mark.integration

FIRST = """script_inline = '''
mkdir -p /srv/tree/deep /srv/keep /srv/move/sub /srv/wasdir
echo a > /srv/tree/a; echo b > /srv/tree/deep/b; echo k > /srv/keep/k; echo f > /srv/file
echo m > /srv/move/sub/m; echo x > /srv/wasdir/x; echo t > /srv/typed
echo l > /srv/linked; ln /srv/linked /srv/linked2
'''"""

# What the late command does, per case; a case's first build has `touch /srv/first` there.
LATE = {
    "deletions": "rm -rf /srv/tree /srv/file",
    # Files of the base image itself: the patch removes them with debugfs, which stamps a
    # freed inode's deletion time (the clean build runs seconds later: its clock must not show).
    "base files removed": "rm /etc/group /bin/arch",
    "renames": "mv /srv/move /srv/moved; mv /srv/keep/k /srv/keep/k2",
    "hard links": "echo n > /srv/new; ln /srv/new /srv/new2; ln /srv/keep/k /srv/keep/k-link",
    "type changes": (
        "rm -rf /srv/wasdir; echo now-a-file > /srv/wasdir; rm /srv/typed; mkdir /srv/typed;"
        " ln -s /srv/keep /srv/typed/link"
    ),
    "owners, modes, nodes": (
        "chown 1000:1001 /srv/keep/k; chmod 4750 /srv/keep; mkfifo /srv/fifo; mknod /srv/null c 1 3"
    ),
    "a directory replaced": "rm -rf /srv/move; mkdir -p /srv/move; echo fresh > /srv/move/fresh",
    # A file with a second name in the export: the diff cannot say it exactly, so this
    # command's layer is exported whole (an anchor).
    "a hard-linked file changed": "echo changed > /srv/linked",
}
ANCHORED = {"a hard-linked file changed"}


def _package(root: Path, marker: str, late: str, *, outputs: bool = False) -> Path:
    text = build_toml(
        marker,
        [FIRST, f"script_inline = '''\n{late}\n'''"],
        container='cap_add = ["MKNOD"]',
    )
    if outputs:  # a side output makes the build export the container whole: the reference
        text += '\n[[outputs]]\npath = "/etc/overlay"\nto = "overlay.out"\n'
    return write_package(root, text)


def _tree(image: Path) -> dict[str, Any]:
    """Every path's type, owner, mode, size, link count, target, device, xattrs and content."""
    tree: dict[str, Any] = {}
    for path, e in list_ext4(image).items():
        content = read_ext4_file(image, e.inode) if e.type == "file" else b""
        tree[path] = (e.type, e.mode, e.uid, e.gid, e.size, e.links, e.target, e.major, e.minor)
        tree[path] += (sorted(e.xattrs.items()), content)
    return tree


def _events(run: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.out.splitlines() if line.startswith("{")]


def _steps(run: Any) -> set[str]:
    """The steps a `--json` build ran."""
    return {e["step"] for e in _events(run) if e["event"] == "step_finished"}


def _exported_whole(run: Any) -> list[str]:
    """The messages saying a DIFF step exported its command's layer whole."""
    texts = [str(e["text"]) for e in _events(run) if e["event"] == "message"]
    return [t for t in texts if "exporting the whole container" in t]


@pytest.mark.parametrize("case", sorted(LATE))
def test_a_late_change_reaches_the_image_exactly(tmp_path: Path, case: str) -> None:
    marker = uuid.uuid4().hex
    pkg, out = tmp_path / "pkg", tmp_path / "image.ext4"
    warm = Rfs(tmp_path / "warm")
    _package(pkg, marker, "touch /srv/first")
    assert warm("build", pkg, "-o", out, "-q").code == 0

    _package(pkg, marker, LATE[case])
    built = warm("build", pkg, "-o", out, "--json")
    assert built.code == 0, built.err
    ran = _steps(built)
    assert "export" not in ran and "run[0]" not in ran, ran  # no whole export, no rerun
    assert {"run[1]", "diff[1]", "assemble"} <= set(ran), ran
    assert bool(_exported_whole(built)) is (case in ANCHORED), _exported_whole(built)

    clean_out = tmp_path / "clean.ext4"
    assert Rfs(tmp_path / "clean")("build", pkg, "-o", clean_out, "-q").code == 0
    assert filecmp.cmp(out, clean_out, shallow=False), "the warm image is not the clean one"

    reference = tmp_path / "reference.ext4"
    _package(tmp_path / "ref", marker, LATE[case], outputs=True)
    made = Rfs(tmp_path / "ref-cache")("build", tmp_path / "ref", "-o", reference, "--json")
    assert made.code == 0, made.err
    assert "export" in _steps(made)  # the reference really took the whole-export route
    assert _tree(out) == _tree(reference)
    assert link_groups(out) == link_groups(reference)


def test_an_image_with_a_large_file_is_a_clean_builds_after_a_late_edit(tmp_path: Path) -> None:
    # A file over 256 MiB (of real blocks, not a hole) makes the base image with its metadata
    # checksums added after mke2fs (rfs.fs.ext4checksums): the warm image is still the bytes
    # of a clean build's, and a sound ext4.
    marker = uuid.uuid4().hex
    pkg, out = tmp_path / "pkg", tmp_path / "image.ext4"
    large = "mkdir -p /srv; yes 0123456789abcdef | head -c 283115520 > /srv/large"

    def package(late: str) -> None:
        commands = [f"script_inline = {json.dumps(large)}", f"command = {json.dumps(late)}"]
        write_package(pkg, build_toml(marker, commands, size_mib=400))

    package("touch /srv/first")
    warm = Rfs(tmp_path / "warm")
    cold = warm("build", pkg, "-o", out, "--log-level", "info")
    assert cold.code == 0, cold.err
    assert "without metadata checksums, added after (a file of 270 MiB)" in cold.err
    package("touch /srv/second")
    built = warm("build", pkg, "-o", out, "--json")
    assert built.code == 0, built.err
    assert "run[0]" not in _steps(built)
    clean_out = tmp_path / "clean.ext4"
    assert Rfs(tmp_path / "clean")("build", pkg, "-o", clean_out, "-q").code == 0
    assert filecmp.cmp(out, clean_out, shallow=False), "the warm image is not the clean one"
    check = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout.decode()
    tree = list_ext4(out)
    assert tree["/srv/large"].size == 283115520 and "/srv/second" in tree
    assert "/srv/first" not in tree
