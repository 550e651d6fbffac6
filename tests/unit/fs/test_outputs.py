"""rfs/fs/outputs.py: `[[outputs]]`, files of the final tree written next to the image, on the
fake engine (no container engine): the content is the image's (commands, overlays, symlinks
followed inside the image), `remove` leaves a file out of the image, an edited or deleted
side output is written again, and a missing path fails naming its field."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rfs.engine.fake import Entry, FakeEngine, FakeRun
from rfs.errors import RfsError
from rfs.fs.outputs import identity, removal_globs
from rfs.graph.planner import Action
from rfs.host import signals
from rfs.pipeline.build import Options, execute, prepare
from rfs.report.reporter import Reporter
from tests.packages import write_package

BUILD = """\
[filesystem]
size_mib = 8
[container]
image = { name = "fake/base", tag = "1" }
[[commands]]
command = "setup"
[[overlays]]
source_inline = "hello"
destination = "/etc/motd"
[[outputs]]
path = "/etc/pkglist"
to = "meta/packages.txt"
[[outputs]]
path = "/etc/key.pub"
[[outputs]]
path = "/etc/motd"
[[outputs]]
path = "/root/secret"
to = "secret"
remove = true
"""


def setup(ctx: FakeRun) -> int:
    assert ctx.argv[0] == "setup"
    ctx.write("/etc/pkglist", b"busybox 1.36\n")
    ctx.write("/etc/ssh/key.pub", b"ssh-ed25519 AAAA\n", mode=0o4755)
    ctx.files["/etc/key.pub"] = Entry("symlink", target="ssh/key.pub")  # followed in the image
    ctx.write("/root/secret", b"s3cret\n", mode=0o600)
    return 0


class Outputs:
    def __init__(self, root: Path, build: str = BUILD) -> None:
        self.pkg = write_package(root / "pkg", build)
        self.out = root / "out" / "image.ext4"
        self.out.parent.mkdir()
        self.cache = root / "cache"
        self.engine = FakeEngine(setup)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})

    def build(self) -> dict[str, Action]:
        opts = Options(package=self.pkg, output=self.out, cache_dir=self.cache)
        with signals.handled():
            planned = prepare(opts, Reporter(), engine_factory=lambda script: self.engine)
            try:
                execute(planned, Reporter())
            finally:
                planned.store.close()
        return {d.step.id: d.action for d in planned.decisions}

    def side(self, name: str) -> Path:
        return self.out.parent / name

    def in_image(self, path: str) -> str:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.out)], capture_output=True, check=True
        )
        return done.stdout.decode()


def test_side_outputs_are_the_images_files(tmp_path: Path) -> None:
    o = Outputs(tmp_path)
    o.build()
    assert o.side("meta/packages.txt").read_text() == "busybox 1.36\n"
    key = o.side("key.pub")
    assert key.read_text() == "ssh-ed25519 AAAA\n" and not key.is_symlink()
    assert key.stat().st_mode & 0o7777 == 0o755  # no setuid next to the image
    assert o.side("motd").read_text() == "hello"  # an overlay's content wins
    assert o.side("secret").read_text() == "s3cret\n"
    assert o.side("secret").stat().st_mode & 0o777 == 0o600
    assert o.in_image("/etc/pkglist") == "busybox 1.36\n"
    assert o.in_image("/root/secret") == ""  # removed from the image


def test_an_edited_or_deleted_side_output_is_written_again(tmp_path: Path) -> None:
    o = Outputs(tmp_path)
    o.build()
    assert o.build()["assemble"] is Action.CACHED
    o.side("motd").write_text("tampered")
    assert o.build()["assemble"] is Action.RUN
    assert o.side("motd").read_text() == "hello"
    o.side("meta/packages.txt").unlink()
    assert o.build()["assemble"] is Action.RUN
    assert o.side("meta/packages.txt").read_text() == "busybox 1.36\n"


@pytest.mark.parametrize("path", ["/etc/nothing", "/etc/ssh"])  # missing; a directory
def test_a_missing_or_non_file_path_fails_naming_its_field(tmp_path: Path, path: str) -> None:
    o = Outputs(tmp_path, BUILD + f'[[outputs]]\npath = "{path}"\nto = "x"\n')
    with pytest.raises(RfsError, match=r"outputs\[4\]\.path"):
        o.build()
    assert not o.side("x").exists()
    assert not o.side("meta/packages.txt").exists()  # nothing written before the check


def test_removal_globs_match_exactly() -> None:
    assert removal_globs(["/etc/a*b", "/x/[y]?"]) == ("/etc/a[*]b", "/x/[[]y][?]")


def test_identity(tmp_path: Path) -> None:
    f = tmp_path / "f"
    assert identity(f) is None
    f.write_bytes(b"abc")
    found = identity(f)
    assert found is not None and found[0] == 3
