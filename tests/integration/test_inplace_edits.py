"""Overlay edits patch the output in place (#16), on the real engine and e2fsprogs.

One busybox package with a cached layer; its overlays change (a file added, changed, removed
and restored) and each warm build writes into the same output: the output keeps its inode (the
in-place route ran) and equals, byte for byte, the image a build of the same package with an
empty cache makes into a new file. An interrupt (SIGTERM to rfs, SIGINT to its process group)
while the in-place patch runs leaves the previous image, bytes and identity; a SIGKILL of rfs
and of the e2fsprogs tool it runs leaves a half-patched output that the next build detects and
rewrites; an output someone else changed takes the copy route.
"""

from __future__ import annotations

import filecmp
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rfs.host.hashing import digest_bytes
from tests.packages import build_toml, write_package
from tests.rfsrun import IsolatedRfs, Run, identity

pytestmark = pytest.mark.integration

# An overlay this big keeps debugfs (and e2undo) busy long enough to be interrupted.
BIG_OVERLAY_MIB = 96


@dataclass
class Edits:
    """The package, its warm cache and output, and clean builds of each version."""

    base: Path
    api: Any
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    clean_images: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rfs = IsolatedRfs(self.base / "warm", self.api)
        self.pkg = self.base / "pkg"
        self.out = self.base / "out" / "image.ext4"
        self.out.parent.mkdir(parents=True)

    def write(self, overlay: str, extra: dict[str, str], big: bytes | None = None) -> str:
        """The package with `overlay` at /etc/overlay, inline overlays `extra` (destination:
        text) and, if given, the file `big` at /srv/big; returns its build script."""
        text = build_toml(
            self.marker, ['command = "mkdir -p /srv/data"'], size_mib=320, overlay=overlay
        )
        for destination, content in extra.items():
            text += f'\n[[overlays]]\nsource_inline = "{content}"\ndestination = "{destination}"\n'
        files: dict[str, str | bytes] = {}
        if big is not None:
            files["big.bin"] = big
            text += '\n[[overlays]]\nsource = "/big.bin"\ndestination = "/srv/big"\n'
        write_package(self.pkg, text, files)
        return text + (digest_bytes(big) if big is not None else "")

    def build(self) -> Run:
        built = self.rfs.run("build", self.pkg, "-o", self.out)
        assert built.code == 0, built.err
        return built

    def clean(self, version: str) -> Path:
        """The image of the package as it is now, built with an empty cache into a new file."""
        if version not in self.clean_images:
            where = self.base / f"clean-{len(self.clean_images)}"
            image = where / "image.ext4"
            where.mkdir()
            built = IsolatedRfs(where, self.api).run("build", self.pkg, "-o", image, "-q")
            assert built.code == 0, built.err
            self.clean_images[version] = image
        return self.clean_images[version]

    def assert_clean_build(self, version: str) -> None:
        assert filecmp.cmp(self.out, self.clean(version), shallow=False), version

    def undo_files(self) -> list[Path]:
        return sorted((self.rfs.cache / "side").glob("*/*"))


@pytest.fixture
def edits(tmp_path: Path, api: Any) -> Edits:
    return Edits(tmp_path, api)


def test_edits_and_reverts_give_a_clean_builds_image_in_place(edits: Edits) -> None:
    first = edits.write("one", {})
    assert "debugfs in place" not in edits.build().err  # no image of rfs's there yet
    edits.assert_clean_build(first)
    inode = edits.out.stat().st_ino
    for overlay, extra in (
        ("one", {"/etc/added": "a new file"}),  # add a file
        ("one", {"/etc/added": "changed"}),  # change it
        ("two", {}),  # remove that overlay, change the other
        ("one", {"/etc/added": "changed"}),  # restore an earlier version
        ("one", {}),  # back to the first
    ):
        version = edits.write(overlay, extra)
        built = edits.build()
        assert built.ran()[-1:] == ["assemble"], built.err  # no command, no export
        assert "export" not in built.ran(), built.err
        assert "(cached base image + debugfs in place (" in built.err, built.err
        assert edits.out.stat().st_ino == inode
        edits.assert_clean_build(version)
    # The undo file and the state of the one output, and the export's parsed headers, beside
    # the one base image.
    # one undo file and its state (beside them: the parsed headers of the export(s) read)
    kept = sorted(p.suffix for p in edits.undo_files() if p.suffix != ".pickle")
    assert kept == [".state", ".undo"]
    assert edits.rfs.run("cache", "clear").code == 0
    assert edits.undo_files() == []


@pytest.mark.parametrize("change", ["touch", "truncate", "replace"])
def test_an_output_changed_by_someone_else_is_rewritten(edits: Edits, change: str) -> None:
    edits.write("one", {})
    edits.build()
    if change == "touch":
        os.utime(edits.out)
    elif change == "truncate":
        os.truncate(edits.out, 1 << 20)
    else:
        replacement = edits.out.with_name("other")
        replacement.write_bytes(b"not an image")
        os.replace(replacement, edits.out)
    inode = edits.out.stat().st_ino
    version = edits.write("two", {})
    built = edits.build()
    assert "(cached base image + debugfs (" in built.err, built.err
    assert edits.out.stat().st_ino != inode
    edits.assert_clean_build(version)


def _patching(edits: Edits) -> Callable[[str], bool]:
    """True once an in-place patch has begun (its marker is in the cache)."""
    return lambda _: any((edits.rfs.cache / "side").glob("*/*.patching"))


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-rfs", "SIGINT-to-group"],
)
def test_an_interrupted_in_place_patch_leaves_the_previous_image(
    edits: Edits, sig: int, group: bool
) -> None:
    edits.write("one", {}, big=os.urandom(BIG_OVERLAY_MIB << 20))
    edits.build()
    before = identity(edits.out)
    previous = edits.out.read_bytes()
    version = edits.write("two", {}, big=os.urandom(BIG_OVERLAY_MIB << 20))
    stopped = edits.rfs.interrupt(
        ["build", edits.pkg, "-o", edits.out, "-q"], _patching(edits), sig, group=group
    )
    assert stopped.code == 130, stopped.err
    edits.rfs.assert_clean(stopped, edits.out, before)  # identity: inode, size, mtime
    assert edits.out.read_bytes() == previous
    assert not any((edits.rfs.cache / "side").glob("*/*.patching"))

    again = edits.build()
    assert "(cached base image + debugfs in place (" in again.err, again.err
    edits.assert_clean_build(version)


def _kill_tools_writing(path: Path) -> None:
    """SIGKILL the e2fsprogs tools rfs runs on `path` (in a session of their own)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(path) in argv and os.path.basename(argv[0]) in (b"debugfs", b"e2undo"):
            os.kill(int(entry.name), signal.SIGKILL)


def test_a_killed_in_place_patch_is_repaired_by_the_next_build(edits: Edits) -> None:
    edits.write("one", {}, big=os.urandom(BIG_OVERLAY_MIB << 20))
    edits.build()
    inode = edits.out.stat().st_ino
    version = edits.write("two", {}, big=os.urandom(BIG_OVERLAY_MIB << 20))
    running = edits.rfs.start("build", edits.pkg, "-o", edits.out, "-q")
    running.wait_for(_patching(edits))
    running.kill()
    _kill_tools_writing(edits.out)
    assert edits.out.stat().st_ino == inode  # written in place, and left half-done
    assert any((edits.rfs.cache / "side").glob("*/*.patching"))

    repaired = edits.build()
    assert "(cached base image + debugfs (" in repaired.err, repaired.err  # rewritten
    assert edits.out.stat().st_ino != inode
    edits.assert_clean_build(version)
    assert not any((edits.rfs.cache / "side").glob("*/*.patching"))
    again = edits.write("one", {}, big=b"small now")
    assert "(cached base image + debugfs in place (" in edits.build().err
    edits.assert_clean_build(again)
