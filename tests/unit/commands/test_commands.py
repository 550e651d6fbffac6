"""The verbs of rfs/commands/ (build, plan, graph, check, cache, pack) run in-process through
`rfs.cli.main`, on the fake engine: `rfs.engine.connect` hands it out, and DOCKER_HOST points
at a socket that does not exist, so the socket shortcut finds no engine and no real engine is
ever reached. Each test checks what the verb printed and what it left, and its exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import rfs.engine
from rfs.cli import main
from rfs.engine.base import Engine
from rfs.engine.fake import FakeEngine
from rfs.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_OK, UsageError
from tests.fakeshell import shell_of
from tests.packages import write_package

BUILD = """\
[filesystem]
size_mib = 8
[container]
image = { name = "fake/base", tag = "1" }
[[commands]]
command = "write /etc/one 1"
[[commands]]
command = "write /etc/two 2"
[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""


shell = shell_of(say=True)


class Cli:
    """A package, a cache directory and the fake engine every verb connects to."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pkg = write_package(root / "pkg", BUILD, {"files/motd": "hello\n"})
        self.cache = root / "cache"
        self.out = root / "out.ext4"
        self.engine = FakeEngine(shell)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
        self.connected: list[tuple[str, str | None]] = []

        def connect(
            engine: str = "docker", uri: str | None = None, timeout_s: float = 60
        ) -> Engine:
            self.connected.append((engine, uri))
            return self.engine

        monkeypatch.setattr(rfs.engine, "connect", connect)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{root}/no-engine.sock")
        monkeypatch.setenv("RFS_CACHE_DIR", str(self.cache))
        for name in ("RFS_CACHE_FROM", "RFS_CACHE_TO", "RFS_CONFIG", "RFS_CACHE_TRUST"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))  # no config file there

    def __call__(self, *argv: str) -> int:
        return main(list(argv))

    def build(self, *more: str) -> int:
        return self(
            "build", str(self.pkg), "-o", str(self.out), "--cache-dir", str(self.cache), *more
        )

    def cat(self, path: str) -> str:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.out)], capture_output=True, check=True
        )
        return done.stdout.decode()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, monkeypatch)


def test_build_writes_the_image_and_plan_then_has_nothing_to_do(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.build() == EXIT_OK
    assert capsys.readouterr().out.strip() == str(cli.out)
    assert cli.cat("/etc/two") == "2\n" and cli.cat("/etc/motd") == "hello\n"
    assert cli.connected == [("docker", None)]
    assert cli.engine.calls.count("run") == 2

    assert cli("plan", str(cli.pkg), "-o", str(cli.out)) == EXIT_OK
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[-1] == "nothing to do: the image is up to date"
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["skip", "base"],  # the image is up to date: nothing before it is needed
        ["skip", "run[0]"],
        ["skip", "diff[0]"],
        ["skip", "run[1]"],
        ["skip", "diff[1]"],
        ["skip", "overlays"],
        ["cached", "assemble"],
    ]


def test_build_runs_as_many_steps_at_once_as_it_has_cores(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-j defaults to the cores this process may use (faked: 3), for one package as for
    several; -j N sets it."""
    import rfs.pipeline.execution as execution
    import rfs.pipeline.scheduler as scheduler

    jobs: list[int] = []
    real = scheduler.run_graph

    def spy(needs: Any, run: Any, jobs_n: int = 1, *more: Any, **named: Any) -> Any:
        jobs.append(jobs_n)
        return real(needs, run, jobs_n, *more, **named)

    monkeypatch.setattr(execution, "run_graph", spy)
    monkeypatch.setattr(scheduler, "default_jobs", lambda: 3)
    assert cli.build() == EXIT_OK
    assert cli.build("-j", "1", "--no-cache") == EXIT_OK
    other = write_package(tmp_path / "other", BUILD, {"files/motd": "hi\n"})
    (tmp_path / "out").mkdir()
    both = ["build", str(cli.pkg), str(other), "--output-dir", str(tmp_path / "out")]
    assert cli(*both) == EXIT_OK and cli(*both, "-j", "2") == EXIT_OK
    assert jobs == [3, 1, 3, 2]
    assert cli.cat("/etc/two") == "2\n" and cli.cat("/etc/motd") == "hello\n"


def test_plan_explains_what_changed(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.build() == EXIT_OK
    (cli.pkg / "build.toml").write_text(BUILD.replace("/etc/two 2", "/etc/two 22"))
    capsys.readouterr()
    assert cli("plan", str(cli.pkg), "--explain") == EXIT_OK  # the last output is remembered
    out, _ = capsys.readouterr()
    assert out.splitlines()[-1] == "3 step(s) to run"
    run1 = out[out.index("run     run[1]") : out.index("run     diff[1]")]
    assert "why: argv changed" in run1
    assert "- commands[1]: command changed (`write /etc/two 2` → `write /etc/two 22`)" in run1
    assert "cached  run[0]" in out and "cached  overlays" in out

    assert cli("plan", str(cli.pkg), "--json") == EXIT_OK
    event = json.loads(capsys.readouterr().out)
    assert event["event"] == "plan"
    actions = {step["step"]: step["action"] for step in event["steps"]}
    assert actions == {
        "base": "skip",
        "run[0]": "cached",
        "diff[0]": "cached",
        "run[1]": "run",
        "diff[1]": "run",
        "overlays": "cached",
        "assemble": "run",
    }


def test_plan_rebuild_and_no_cache(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.build() == EXIT_OK
    capsys.readouterr()
    assert cli("plan", str(cli.pkg), "--rebuild", "run[1]") == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == "3 step(s) to run"
    assert cli("plan", str(cli.pkg), "--no-cache") == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == "6 step(s) to run"
    assert cli("plan", str(cli.pkg), "--rebuild", "run[9]") == UsageError.exit_code
    assert "--rebuild run[9]: no such step" in capsys.readouterr().err


def test_build_json_streams_events(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.build("--json", "-q") == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "build_finished"
    assert events[-1]["ok"] is True and events[-1]["output"] == str(cli.out)
    assert (events[-1]["ran"], events[-1]["cached"]) == (6, 1)
    done = [e["step"] for e in events if e["event"] == "step_finished"]
    # The overlays and the diffs run beside the commands (-j: the cores): any order the graph
    # allows.
    assert sorted(done) == sorted(
        ["run[0]", "diff[0]", "run[1]", "diff[1]", "overlays", "assemble"]
    )
    chain = [done.index(step) for step in ("run[0]", "diff[0]", "diff[1]", "assemble")]
    assert chain == sorted(chain) and done.index("run[1]") < done.index("diff[1]")
    assert done.index("overlays") < done.index("assemble")


def test_a_failed_build_exits_with_the_step_failure(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    (cli.pkg / "build.toml").write_text(BUILD.replace("write /etc/two 2", "fail"))
    code = cli.build("--keep-failed")
    err = capsys.readouterr().err
    assert code != EXIT_OK
    assert "run[1]" in err and "exited with code 3" in err
    assert not cli.out.exists()
    kept = list(cli.engine.kept)
    assert len(kept) == 1
    assert f"docker commit {kept[0][:12]} rfs/failed:{kept[0][:12]}" in err


def test_build_verify_runs_the_checker(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.build("--verify") == EXIT_OK
    assert f"rfs: {cli.out}: ext4 checker found no problem" in capsys.readouterr().err


def test_graph_dot_shows_states_edges_and_timings(
    cli: Cli, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli("graph", str(cli.pkg)) == EXIT_OK  # nothing built yet: every step runs
    dot = capsys.readouterr().out
    assert dot.startswith("digraph rfs {") and dot.rstrip().endswith("}")
    assert '"run[0]" -> "run[1]";' in dot and '"overlays" -> "assemble";' in dot
    assert '"run[1]" -> "diff[1]";' in dot and '"diff[0]" -> "diff[1]";' in dot
    assert dot.count('fillcolor="#ffe0b2"') == 6  # to run: all but the base
    assert "last " not in dot

    assert cli.build() == EXIT_OK
    (cli.pkg / "files" / "motd").write_text("edited\n")
    target = tmp_path / "graph.dot"
    assert cli("graph", str(cli.pkg), "-o", str(target), "--image", str(cli.out)) == EXIT_OK
    dot = target.read_text()
    assert dot.count('fillcolor="#eeeeee"') == 3  # base, run[0], run[1]: not needed
    assert dot.count('fillcolor="#c8e6c9"') == 2  # the diffs of both commands are cached
    assert dot.count('fillcolor="#ffe0b2"') == 2  # overlays and assemble run
    assert "to run · last " in dot  # the last build's timings are shown
    assert "why: /etc/motd content changed" in dot

    assert cli("graph", str(cli.pkg), "-o", str(tmp_path / "no" / "dir.dot")) != EXIT_OK
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graph_svg_is_drawn_by_dot(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "graph.svg"
    assert cli("graph", str(cli.pkg), "--format", "svg", "-o", str(target)) == EXIT_OK
    svg = target.read_text()
    assert "<svg" in svg and "run[1]" in svg


def test_check_reports_ok_and_the_missing_base(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("check", str(cli.pkg)) == EXIT_OK
    out = capsys.readouterr().out
    assert "ok (2 command(s), 1 overlay(s), ext4 image)" in out
    assert cli.connected  # the engine was asked

    (cli.pkg / "build.toml").write_text(BUILD.replace('tag = "1"', 'tag = "2"'))
    assert cli("check", str(cli.pkg)) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    assert "container.image" in err and "fake/base:2" in err

    (cli.pkg / "build.toml").write_text(BUILD.replace("size_mib = 8", "size_mib = -1"))
    assert cli("check", str(cli.pkg)) == EXIT_BAD_INPUT
    assert "filesystem.size_mib" in capsys.readouterr().err


def test_cache_info_prune_and_clear(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.build() == EXIT_OK
    capsys.readouterr()
    assert cli("cache", "info", "--json") == EXIT_OK
    stats = json.loads(capsys.readouterr().out)
    assert stats["kinds"]["run"]["entries"] == 2
    # a layered build: a diff per command, laid on the base image's export (a local entry)
    assert stats["kinds"]["diff"]["entries"] == 2 and stats["kinds"]["diff"]["bytes"] > 0
    assert stats["kinds"]["base-export"]["entries"] == 1 and "export" not in stats["kinds"]
    assert stats["blob_bytes"] > 0

    assert cli("cache", "info") == EXIT_OK
    out = capsys.readouterr().out
    assert f"cache directory: {cli.cache}" in out
    run_row = next(line.split() for line in out.splitlines() if line.strip().startswith("run "))
    assert run_row[:2] == ["run", "2"]

    assert cli("cache", "prune") == UsageError.exit_code
    assert "needs --max-size and/or --older-than" in capsys.readouterr().err
    assert cli("cache", "prune", "--older-than", "7d") == EXIT_OK
    assert capsys.readouterr().out.startswith("dropped 0 entries (0 layer images)")

    layers = [tag for tag in cli.engine.tags if tag.startswith("rfs/layer")]
    assert len(layers) == 2
    assert cli("cache", "clear") == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("dropped ") and "(2 layer images)" in out
    assert not [tag for tag in cli.engine.tags if tag.startswith("rfs/layer")]
    assert cli("cache", "info", "--json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["entries"] == 0


def test_cache_prune_parses_ages(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli("cache", "prune", "--older-than", "soon")
    assert "soon" in capsys.readouterr().err


def test_cache_keygen_writes_a_secret_key_once(
    cli: Cli, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = tmp_path / "ci-2025.key"
    assert cli("cache", "keygen", str(key)) == EXIT_OK
    out, err = capsys.readouterr()
    assert "ci-2025" in out and len(out.strip().splitlines()) == 1
    assert key.stat().st_mode & 0o777 == 0o600
    assert "wrote the secret key" in err
    before = key.read_bytes()
    assert cli("cache", "keygen", str(key)) != EXIT_OK  # never over an existing file
    assert key.read_bytes() == before


def test_pack_and_unpack_round_trip(cli: Cli, tmp_path: Path) -> None:
    packed = tmp_path / "pkg.tar.gz"
    assert cli("pack", str(cli.pkg), str(packed), "-t", "tar-gz") == EXIT_OK
    again = tmp_path / "again.tar.gz"
    assert cli("pack", str(cli.pkg), str(again), "-t", "tar-gz") == EXIT_OK
    assert packed.read_bytes() == again.read_bytes()  # deterministic
    unpacked = tmp_path / "unpacked"
    assert cli("unpack", str(packed), str(unpacked)) == EXIT_OK
    assert (unpacked / "build.toml").read_text() == BUILD
    assert (unpacked / "files" / "motd").read_text() == "hello\n"


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == UsageError.exit_code
    assert "usage: rfs" in capsys.readouterr().err


def test_boot_arch_takes_names_and_platforms(capsys: pytest.CaptureFixture[str]) -> None:
    from rfs.commands import make_parser

    parser = make_parser()
    for given, arch in [("aarch64", "arm64"), ("linux/arm64/v8", "arm64"), ("AMD64", "amd64")]:
        assert parser.parse_args(["boot", "x.ext4", "--arch", given]).arch == arch
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["boot", "x.ext4", "--arch", "linux/riscv64"])
    assert caught.value.code == EXIT_BAD_INPUT
    assert "'linux/riscv64' is not amd64 or arm64" in capsys.readouterr().err
