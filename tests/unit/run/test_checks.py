"""rfs/run/checks.py: what `rfs check` finds wrong with the machine, each at its field, asked
of the fake engine (no container engine) and of the tools on PATH."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pytest

import rfs.engine
import rfs.fs.assemble
from rfs.engine.base import EMPTY, Engine
from rfs.engine.fake import FakeEngine
from rfs.engine.faketree import tar_of
from rfs.errors import EngineError, EnvironmentProblem
from rfs.run.checks import (
    base_archive_problems,
    environment_problems,
    mkfs_problems,
    privilege_field,
    privilege_refusal,
)
from rfs.script.model import BuildScript
from rfs.script.package import load
from tests.packages import write_package

HEAD = '[container]\nimage = { name = "fake/base", tag = "1" }\n'


class Refusing(FakeEngine):
    """Refuses privileged containers (`privileged`), or every container (`everything`)."""

    def __init__(self, refuse: Collection[bool] = (True,)) -> None:
        super().__init__()
        self.refuse = refuse
        self.probes: list[bool] = []

    def probe_start(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool,
        labels: Mapping[str, str] = EMPTY,
    ) -> str | None:
        self.probes.append(privileged)
        return (
            "unable to apply caps: operation not permitted" if privileged in self.refuse else None
        )


def script_of(root: Path, toml: str, files: dict[str, str | bytes] | None = None) -> BuildScript:
    return load(write_package(root, toml, files)).script


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Refusing:
    fake = Refusing()
    fake.add_image("fake/base:1", {"/bin/true": b"#!fake\n"})

    def connect(kind: str = "docker", uri: str | None = None, timeout_s: float = 60) -> Engine:
        return fake

    monkeypatch.setattr(rfs.engine, "connect", connect)
    return fake


def test_a_machine_with_nothing_wrong(tmp_path: Path, engine: Refusing) -> None:
    assert environment_problems(script_of(tmp_path, HEAD), "build.toml") == []
    assert engine.probes == []  # nothing privileged asked for: no probe


def test_a_refused_privilege_is_reported_at_its_field(tmp_path: Path, engine: Refusing) -> None:
    toml = HEAD + '[[commands]]\ncommand = "true"\n[[commands]]\ncommand = "x"\nprivileged = true\n'
    script = script_of(tmp_path, toml)
    assert privilege_field(script) == "commands[1].privileged"
    (problem,) = environment_problems(script, "build.toml")
    assert problem.path == "commands[1].privileged"
    assert "the Docker engine refuses to start one here: unable to apply caps" in problem.message
    assert engine.probes == [True, False]  # the unprivileged one starts: privilege is the cause

    rootful = script_of(tmp_path / "rootful", HEAD + "rootful = true\n")
    assert privilege_field(rootful) == "container.rootful"
    engine.refuse = (True, False)  # both fail: not privilege's fault, nothing claimed
    assert environment_problems(rootful) == []


def test_privilege_refusal(engine: Refusing) -> None:
    engine.refuse = ()
    assert privilege_refusal(engine, "img") is None
    assert engine.probes == [True]
    engine.refuse = (True,)
    assert privilege_refusal(engine, "img", {"a": "b"}) == (
        "unable to apply caps: operation not permitted"
    )


def test_an_engine_that_does_not_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def connect(kind: str = "docker", uri: str | None = None, timeout_s: float = 60) -> Engine:
        raise EngineError(f"cannot reach {kind} at {uri}")

    monkeypatch.setattr(rfs.engine, "connect", connect)
    toml = HEAD + 'connection_uri = "unix:///nowhere.sock"\n'
    problems = environment_problems(script_of(tmp_path, toml))
    assert [(p.path, p.message) for p in problems] == [
        ("container.connection_uri", "cannot reach docker at unix:///nowhere.sock")
    ]


def test_a_missing_base_image(tmp_path: Path, engine: Refusing) -> None:
    toml = HEAD.replace('tag = "1"', 'tag = "9"')
    (problem,) = environment_problems(script_of(tmp_path, toml))
    assert problem.path == "container.image" and "fake/base:9" in problem.message


def test_a_dockerfile_naming_a_missing_image(tmp_path: Path, engine: Refusing) -> None:
    toml = '[container]\ndockerfile = "/Dockerfile"\nbuild_args = { V = "2" }\n'
    dockerfile = "ARG V=1\nFROM fake/base:1 AS a\nFROM fake/base:$V\nCOPY --from=a /x /x\n"
    (problem,) = environment_problems(script_of(tmp_path, toml, {"Dockerfile": dockerfile}))
    assert problem.path == "container.dockerfile"
    assert problem.message.startswith("FROM image fake/base:2 is not in the docker engine")
    engine.add_image("fake/base:2", {"/bin/true": b"#!fake\n"})
    assert environment_problems(script_of(tmp_path / "b", toml, {"Dockerfile": dockerfile})) == []


def test_a_missing_mkfs_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = script_of(tmp_path, HEAD)
    assert mkfs_problems(script) == []  # mke2fs is installed

    def missing(fs_type: object, *, fresh: bool = False) -> str:
        raise EnvironmentProblem("required tool 'mke2fs' is not installed", hint="apt-get it")

    monkeypatch.setattr(rfs.fs.assemble, "tool_version", missing)
    (problem,) = mkfs_problems(script, "build.toml")
    assert problem.path == "filesystem.type"
    assert problem.message == "required tool 'mke2fs' is not installed (apt-get it)"


def test_base_archive_problems(tmp_path: Path) -> None:
    toml = '[container]\narchive = "/images/base.tar"\n'
    good = script_of(tmp_path / "good", toml, {"images/base.tar": tar_of({"bin/sh": b"x"})})
    assert base_archive_problems(good) == []
    empty = script_of(tmp_path / "empty", toml, {"images/base.tar": tar_of({})})
    (problem,) = base_archive_problems(empty, "build.toml")
    assert problem.path == "container.archive" and "empty tar archive" in problem.message
    assert base_archive_problems(script_of(tmp_path / "image", HEAD)) == []  # no archive
