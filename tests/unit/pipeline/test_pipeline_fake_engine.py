"""The whole build pipeline (load, compile, plan, execute, cache, assemble) on the fake engine:
no Docker, no Podman, real mke2fs. What the real-engine suite proves slowly, proven here fast
and with faults a real engine cannot be made to produce on demand."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import Interrupted, StepFailed
from rfs.graph.planner import Action
from rfs.host import signals
from rfs.pipeline.build import Options, execute, prepare
from rfs.remote.config import RemoteSettings
from rfs.report.reporter import Reporter
from rfs.run.snapshot import PackageChanged
from rfs.run.store import Store
from tests.fakeshell import shell_of

BUILD = """\
[filesystem]
size_mib = 8
[container]
image = { name = "fake/base", tag = "1" }
[[commands]]
command = "write /etc/one 1"
[[commands]]
command = "write /etc/two 2"
[[commands]]
script_path = "/scripts/three.sh"
[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""


shell = shell_of(say=True, script_to="/etc/three")


class World:
    """A package, a cache and a fake engine holding the base image."""

    def __init__(self, root: Path, run: Callable[[FakeRun], int] = shell) -> None:
        self.root = root
        self.pkg = root / "pkg"
        (self.pkg / "scripts").mkdir(parents=True)
        (self.pkg / "files").mkdir()
        (self.pkg / "build.toml").write_text(BUILD)
        (self.pkg / "scripts" / "three.sh").write_text("#!/bin/sh\necho three\n")
        (self.pkg / "files" / "motd").write_text("hello\n")
        self.engine = FakeEngine(run)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n", "/etc/hostname": b"x\n"})
        self.out = root / "out.ext4"
        self.cache = root / "cache"

    def build(
        self,
        *,
        no_cache: bool = False,
        rebuild: tuple[str, ...] = (),
        keep_failed: bool = False,
        pull: bool = False,
        remote: RemoteSettings | None = None,
    ) -> dict[str, Action]:
        """Build; return what happened to each step."""
        opts = Options(
            package=self.pkg,
            output=self.out,
            cache_dir=self.cache,
            no_cache=no_cache,
            rebuild=rebuild,
            keep_failed=keep_failed,
            pull=pull,
            remote=remote,
        )
        # As the command line does: signals handled, and none left over from another test.
        with signals.handled():
            planned = prepare(opts, Reporter(), engine_factory=lambda script: self.engine)
            try:
                execute(planned, Reporter())
            finally:
                planned.store.close()
        return {d.step.id: d.action for d in planned.decisions}

    def cat(self, path: str) -> str:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.out)], capture_output=True, check=True
        )
        return done.stdout.decode()


RAN = Action.RUN
COMMANDS = {"run[0]", "run[1]", "run[2]"}
DIFFS = {"diff[0]", "diff[1]", "diff[2]"}


def ran(actions: dict[str, Action]) -> set[str]:
    return {step for step, action in actions.items() if action is RAN}


def test_build_noop_and_edits(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert ran(w.build()) == COMMANDS | DIFFS | {"overlays", "assemble"}
    # a layered build: the diffs of the commands laid on the base image's export
    assert w.engine.calls.count("export") == 1 and w.engine.calls.count("layer_diff") == 3
    assert w.cat("/etc/two") == "2\n" and w.cat("/etc/motd") == "hello\n"
    assert w.cat("/etc/three") == "#!/bin/sh\necho three\n"
    image = w.out.read_bytes()
    runs = w.engine.calls.count("run")

    assert ran(w.build()) == set()  # a no-op
    assert w.engine.calls.count("run") == runs and w.out.read_bytes() == image

    (w.pkg / "files" / "motd").write_text("edited\n")  # an overlay: no container
    assert ran(w.build()) == {"overlays", "assemble"}
    assert w.engine.calls.count("run") == runs and w.cat("/etc/motd") == "edited\n"

    (w.pkg / "build.toml").write_text(BUILD.replace("/etc/two 2", "/etc/two 22"))
    assert ran(w.build()) == {"run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"}
    assert w.cat("/etc/two") == "22\n" and w.engine.calls.count("export") == 1


def test_warm_and_clean_builds_give_the_same_bytes(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    (w.pkg / "scripts" / "three.sh").write_text("#!/bin/sh\necho THREE\n")
    w.build()
    clean = World(tmp_path / "clean")
    (clean.pkg / "scripts" / "three.sh").write_text("#!/bin/sh\necho THREE\n")
    clean.build()
    assert w.out.read_bytes() == clean.out.read_bytes()


def test_no_cache_and_rebuild(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    assert ran(w.build(no_cache=True)) == COMMANDS | DIFFS | {"overlays", "assemble"}
    assert ran(w.build(rebuild=("run[2]",))) == {"run[2]", "diff[2]", "assemble"}
    assert ran(w.build()) == set()


def test_a_failed_command_records_nothing_and_the_next_build_resumes(tmp_path: Path) -> None:
    w = World(tmp_path)
    (w.pkg / "build.toml").write_text(BUILD.replace("write /etc/two 2", "fail"))
    with pytest.raises(StepFailed, match=r"run\[1\] .*failed: exited with code 3"):
        w.build()
    assert not w.out.exists()
    (w.pkg / "build.toml").write_text(BUILD)
    assert ran(w.build()) == {"run[1]", "diff[1]", "run[2]", "diff[2]", "overlays", "assemble"}


def test_keep_failed_leaves_the_container_and_the_next_build_keeps_it(tmp_path: Path) -> None:
    w = World(tmp_path)
    (w.pkg / "build.toml").write_text(BUILD.replace("write /etc/two 2", "fail"))
    with pytest.raises(StepFailed) as failed:
        w.build(keep_failed=True)
    assert failed.value.container in w.engine.kept


def test_an_interrupt_during_a_command_keeps_what_finished(tmp_path: Path) -> None:
    def interrupted(ctx: FakeRun) -> int:
        if ctx.argv[:2] == ("write", "/etc/two"):
            raise KeyboardInterrupt
        return shell(ctx)

    w = World(tmp_path, interrupted)
    with pytest.raises(Interrupted, match=r"during run\[1\]: 2 step\(s\) finished"):
        w.build()
    w.engine.run = shell
    assert ran(w.build()) == {"run[1]", "diff[1]", "run[2]", "diff[2]", "overlays", "assemble"}


def test_a_package_file_edited_after_planning_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    opts = Options(package=w.pkg, output=w.out, cache_dir=w.cache)
    planned = prepare(opts, Reporter(), engine_factory=lambda script: w.engine)
    (w.pkg / "scripts" / "three.sh").write_text("#!/bin/sh\necho edited after planning\n")
    try:
        with pytest.raises(PackageChanged, match=r"/scripts/three\.sh changed"):
            execute(planned, Reporter())
    finally:
        planned.store.close()
    store = Store(w.cache)
    try:
        assert not any(
            r.get("kind") == "run" for _, r in store.records() if r.get("step") == "run[2]"
        )
    finally:
        store.close()
    assert ran(w.build())  # the next build plans with the new content
    assert w.cat("/etc/three") == "#!/bin/sh\necho edited after planning\n"


def test_the_engine_platform_and_version_are_in_the_keys(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    w.engine._platform = "linux/arm64"
    assert "run[0]" in ran(w.build())
    w.engine._version = "fake-2"
    assert ran(w.build()) == DIFFS | {"assemble"}


def test_the_engine_version_is_in_the_export_key(tmp_path: Path) -> None:
    w = World(tmp_path)
    (w.pkg / "build.toml").write_text(
        BUILD.replace("size_mib = 8", 'size_mib = 8\ntype = "Squashfs"')
    )
    assert "export" in ran(w.build())
    w.engine._version = "fake-2"
    assert ran(w.build()) == {"export", "assemble"}


def test_pull_without_a_registry_is_an_environment_problem(tmp_path: Path) -> None:
    from rfs.errors import EnvironmentProblem

    w = World(tmp_path)
    with pytest.raises(EnvironmentProblem, match="--pull: cannot look up"):
        w.build(pull=True)


def test_remote_cache_round_trip_and_a_hostile_copy(tmp_path: Path) -> None:
    """A writes to an HTTP cache; B, with an empty cache and an engine without A's layers,
    downloads the layer of run[1] (docker load of rfs's own tarball) and runs only what
    follows a changed command. Then a server that damages objects costs B a miss, never a
    wrong image."""
    from tests.hostileserver import FakeCache

    server = FakeCache()
    try:
        a = World(tmp_path / "a")
        settings = RemoteSettings(sources=(server.url,), target=server.url, timeout_s=5)
        a.build(remote=settings)
        assert server.records and server.objects

        b = World(tmp_path / "b")
        (b.pkg / "scripts" / "three.sh").write_text("#!/bin/sh\necho changed\n")
        reading = RemoteSettings(sources=(server.url,), timeout_s=5)
        assert ran(b.build(remote=reading)) == {"run[2]", "diff[2]", "assemble"}
        assert b.cat("/etc/two") == "2\n" and "run" not in b.engine.calls[:1]
        assert b.engine.calls.count("run") == 1

        for name in server.objects:  # every object damaged, sizes kept
            data = bytearray(server.objects[name])
            data[len(data) // 2] ^= 0xFF
            server.objects[name] = bytes(data)
        # The image and the layer diffs are objects: misses. The tiny layers ride inside
        # their records, so every command's layer is still fetched and diffed again here.
        c = World(tmp_path / "c")
        assert ran(c.build(remote=reading)) == DIFFS | {"assemble"}
        assert c.engine.calls.count("run") == 0
        assert c.out.read_bytes() == a.out.read_bytes()
    finally:
        server.stop()
