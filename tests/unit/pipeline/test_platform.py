"""`container.platform` and `--platform` on the fake engine: the field's form (TOML and YAML),
the flag winning, every key holding the platform (amd64 and arm64 builds of one package share
no step), a base of another platform refused, the Dockerfile build told the platform, and the
host's emulation checked first (`rfs.host.emulation`, against a binfmt_misc directory of the
test's own). The real engines and emulation are in tests/integration/test_arm64.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import rfs.host.emulation
from rfs.engine.fake import FakeEngine
from rfs.errors import EnvironmentProblem, ScriptError, UsageError
from rfs.host import signals
from rfs.host.emulation import cannot_run, host_architecture
from rfs.pipeline.build import Options, Planned, execute, prepare
from rfs.report.reporter import Reporter
from rfs.run.checks import platform_problems
from rfs.script.package import load
from rfs.script.platform import architecture, is_platform, matches, with_platform

# A binfmt_misc entry as the kernel shows Debian's qemu-aarch64 handler.
AARCH64_ENTRY = (
    "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"
    "magic 7f454c460201010000000000000000000200b700\n"
    "mask ffffffffffffff00fffffffffffffffffeffffff\n"
)


@pytest.fixture(autouse=True)
def binfmt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A binfmt_misc of the test's own, with an aarch64 handler registered."""
    where = tmp_path / "binfmt_misc"
    where.mkdir()
    (where / "register").write_text("")
    (where / "status").write_text("enabled\n")
    (where / "qemu-aarch64").write_text(AARCH64_ENTRY)
    monkeypatch.setattr(rfs.host.emulation, "BINFMT_MISC", where)
    return where


def package(root: Path, platform: str | None, *, dockerfile: bool = False) -> Path:
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    field = f'platform = "{platform}"\n' if platform else ""
    base = (
        'dockerfile = "/Dockerfile"\n'
        if dockerfile
        else 'image = { name = "fake/base", tag = "1" }\n'
    )
    (pkg / "Dockerfile").write_text("FROM fake/base:1\nRUN true\n")
    (pkg / "motd").write_text("hello\n")
    (pkg / "build.toml").write_text(
        f"[filesystem]\nsize_mib = 8\n[container]\n{base}{field}"
        '[[commands]]\ncommand = "true"\n'
        '[[overlays]]\nsource = "/motd"\ndestination = "/etc/motd"\n'
    )
    return pkg


def plan(
    tmp_path: Path,
    engine: FakeEngine,
    pkg: Path,
    platform: str | None = None,
    *,
    pull: bool = False,
) -> Planned:
    opts = Options(
        package=pkg,
        output=tmp_path / "o.ext4",
        cache_dir=tmp_path / "cache",
        platform=platform,
        pull=pull,
    )
    planned = prepare(opts, Reporter(), engine_factory=lambda script: engine)
    planned.store.close()
    return planned


def engine_of(platform: str) -> FakeEngine:
    engine = FakeEngine(platform=platform)
    engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
    return engine


def test_the_form_and_matching() -> None:
    assert is_platform("linux/arm64") and is_platform("linux/arm/v7")
    assert not is_platform("arm64") and not is_platform("linux/arm64/v8/x")
    assert not is_platform("Linux/ARM64")
    assert matches("linux/arm64", "linux/arm64/v8") and matches("linux/arm64/v8", "linux/arm64")
    assert matches("linux/x86_64", "linux/amd64") and matches("linux/aarch64", "linux/arm64")
    assert not matches("linux/arm64", "linux/amd64") and not matches("linux/arm/v6", "linux/arm/v7")
    assert architecture("linux/aarch64") == "arm64"


def test_a_malformed_platform_is_named(tmp_path: Path) -> None:
    pkg = package(tmp_path, "arm64")
    with pytest.raises(ScriptError) as caught:
        load(pkg)
    assert any(
        p.path == "container.platform" and "'arm64' is not os/architecture" in p.message
        for p in caught.value.problems
    )
    script = load(package(tmp_path / "b", None)).script
    with pytest.raises(UsageError, match=r"^--platform: 'amd64' is not os/architecture"):
        with_platform(script, "amd64")


def test_yaml_takes_the_field(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "build.yaml").write_text(
        "filesystem: {size_mib: 8}\ncontainer:\n  image: {name: fake/base, tag: '1'}\n"
        "  platform: linux/arm64\n"
    )
    assert load(pkg).script.container.platform == "linux/arm64"


def test_amd64_and_arm64_builds_share_no_step(tmp_path: Path) -> None:
    amd = plan(tmp_path / "a", engine_of("linux/amd64"), package(tmp_path / "a", "linux/amd64"))
    arm = plan(tmp_path / "b", engine_of("linux/arm64"), package(tmp_path / "b", "linux/arm64"))
    assert {s.key for s in amd.steps}.isdisjoint({s.key for s in arm.steps})
    base = next(s for s in arm.steps if s.id == "base")
    assert base.inputs["asked_platform"] == "linux/arm64"
    assert base.inputs["platform"] == "linux/arm64"
    # Without the field, the keys are those of any build on that base, as before the field.
    unset = plan(tmp_path / "c", engine_of("linux/amd64"), package(tmp_path / "c", None))
    assert "asked_platform" not in next(s for s in unset.steps if s.id == "base").inputs
    overlays = next(s for s in unset.steps if s.id == "overlays")
    assert "platform" not in overlays.inputs


def test_the_flag_wins_over_the_field(tmp_path: Path) -> None:
    planned = plan(
        tmp_path, engine_of("linux/arm64"), package(tmp_path, "linux/amd64"), "linux/arm64"
    )
    assert planned.script.container.platform == "linux/arm64"
    with pytest.raises(UsageError, match="--platform"):
        plan(tmp_path / "x", engine_of("linux/arm64"), package(tmp_path / "x", None), "arm")


def test_a_base_of_another_platform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem) as caught:
        plan(tmp_path, engine_of("linux/amd64"), package(tmp_path, "linux/arm64"))
    assert caught.value.message == (
        "container.platform: the base image fake/base:1 is linux/amd64, not linux/arm64"
    )


def test_a_dockerfile_is_built_for_the_platform_and_keyed_by_it(tmp_path: Path) -> None:
    engine = engine_of("linux/arm64")
    planned = plan(tmp_path, engine, package(tmp_path, "linux/arm64", dockerfile=True))
    assert engine.build_platforms == ["linux/arm64"]
    base = next(s for s in planned.steps if s.id == "base")
    assert base.inputs["platform"] == "linux/arm64" and base.inputs["asked_platform"]


def test_the_export_container_is_created_for_the_platform(tmp_path: Path) -> None:
    engine = engine_of("linux/arm64")
    opts = Options(
        package=package(tmp_path, "linux/arm64"),
        output=tmp_path / "o.ext4",
        cache_dir=tmp_path / "cache",
    )
    with signals.handled():
        planned = prepare(opts, Reporter(), engine_factory=lambda script: engine)
        try:
            execute(planned, Reporter())
        finally:
            planned.store.close()
    assert engine.export_platforms == ["linux/arm64"]
    assert (tmp_path / "o.ext4").is_file()


def test_pull_asks_the_registry_for_the_platform(tmp_path: Path) -> None:
    engine = engine_of("linux/arm64")
    with pytest.raises(EnvironmentProblem, match="--pull"):
        plan(tmp_path, engine, package(tmp_path, None), "linux/arm64", pull=True)
    assert engine.pull_platforms == ["linux/arm64"]


def test_a_host_that_cannot_run_the_platform_fails_first(tmp_path: Path, binfmt: Path) -> None:
    if host_architecture() != "amd64":
        pytest.skip("written for an amd64 host")
    (binfmt / "qemu-aarch64").unlink()
    engine = engine_of("linux/arm64")
    pkg = package(tmp_path, "linux/arm64")
    with pytest.raises(EnvironmentProblem) as caught:
        plan(tmp_path, engine, pkg)
    assert caught.value.message == (
        "container.platform: this host cannot run linux/arm64 programs: no binfmt_misc "
        "handler runs arm64 programs on this amd64 host"
    )
    assert caught.value.hint is not None and "scripts/setup-host.sh" in caught.value.hint
    assert engine.calls == []  # before anything else
    (problem,) = platform_problems(load(pkg).script)
    assert problem.path == "container.platform" and "qemu-user-static" in problem.message


def test_cannot_run(binfmt: Path) -> None:
    if host_architecture() != "amd64":
        pytest.skip("written for an amd64 host")
    assert cannot_run("amd64") is None
    assert cannot_run("arm64") is None
    assert (
        cannot_run("riscv64") == "no binfmt_misc handler runs riscv64 programs on this amd64 host"
    )
    assert cannot_run("sparc") == "rfs knows no ELF machine for the architecture sparc"
    (binfmt / "qemu-aarch64").write_text(AARCH64_ENTRY.replace("enabled", "disabled"))
    assert cannot_run("arm64") is not None
    (binfmt / "register").unlink()
    assert cannot_run("arm64") == (
        f"binfmt_misc is not mounted at {binfmt}, so no arm64 emulator is registered"
    )
