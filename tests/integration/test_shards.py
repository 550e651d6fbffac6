"""`rfs build PKG... --shard I/N --cache-to URL` on the real engine with the real cache servers
of cache/: three runners, each with its own empty cache directory, started together.

Each unique step that a cache carries (commands, exports, images) runs once across the three
(their `--json` events), every runner ends with every image, and each image equals a clean
build's byte for byte. A runner killed mid-build (SIGKILL) costs the others time, never an
image: they build its steps once its deadline (`--shard-wait`) passes.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.pipeline.shard import owner
from tests.cacheservers import Server, ServerMissing, start_nginx, start_registry
from tests.conftest import require_or_skip
from tests.events import validate_events
from tests.packages import build_toml, write_package
from tests.rfsrun import Rfs, Run, containers_of
from tests.waiting import until

pytestmark = pytest.mark.integration

NAMES = ("web", "db", "cache")
SHARED_KINDS = {"run", "export", "diff", "assemble"}  # what a remote cache carries


def _server(start: Callable[[], Server]) -> Iterator[Server]:
    try:
        server = start()
    except ServerMissing as exc:
        require_or_skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["http", "oci"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    yield from _server(start_nginx if request.param == "http" else start_registry)


@pytest.fixture
def nginx() -> Iterator[Server]:
    yield from _server(start_nginx)


def family(root: Path, marker: str) -> list[Path]:
    """Three packages sharing two commands that take a known time, each with one of its own."""
    shared = [f'script_inline = "sleep 1; touch /{what}"' for what in ("one", "two")]
    return [
        write_package(
            root / name,
            build_toml(marker, [*shared, f'script_inline = "sleep 1; touch /{name}"'], size_mib=16),
        )
        for name in NAMES
    ]


def events_of(run: Run) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in run.out.splitlines()]
    validate_events(events)
    return events


def ran_keys(events: list[dict[str, Any]]) -> list[str]:
    """The keys of the steps a cache carries that this runner ran (built)."""
    return [e["key"] for e in events if e["event"] == "step_finished" and e["kind"] in SHARED_KINDS]


def planned_keys(rfs: Rfs, packages: list[Path]) -> set[str]:
    """The keys of every step a cache carries, from `rfs plan --json` (one event per package)."""
    plan = rfs("plan", *packages, "--json")
    assert plan.code == 0, plan.err
    return {
        s["key"]
        for line in plan.out.splitlines()
        for s in json.loads(line)["steps"]
        if s["kind"] in SHARED_KINDS
    }


def clean_build(tmp_path: Path, packages: list[Path]) -> Path:
    out = tmp_path / "clean"
    out.mkdir()
    clean = Rfs(tmp_path / "cache-clean", timeout_s=600)("build", *packages, "--output-dir", out)
    assert clean.code == 0, clean.err
    return out


def shard_args(packages: list[Path], out: Path, shard: str, url: str) -> list[str | Path]:
    return [
        "build",
        *packages,
        "--output-dir",
        out,
        "--shard",
        shard,
        "--cache-to",
        url,
        "--json",
        "-j",
        "2",
        # A bound on what a missed record would cost: the owners' steps take seconds.
        "--shard-wait",
        "60",
    ]


def test_three_shards_run_each_step_once_and_all_end_with_every_image(
    tmp_path: Path, server: Server, docker_client: Any
) -> None:
    del docker_client  # the engine must be there
    packages = family(tmp_path / "pkgs", uuid.uuid4().hex)
    rfs = [Rfs(tmp_path / f"cache-{i}", timeout_s=600) for i in (1, 2, 3)]
    outs = [tmp_path / f"out-{i}" for i in (1, 2, 3)]
    for out in outs:
        out.mkdir()
    running = [
        r.start(*shard_args(packages, out, f"{i}/3", server.url))
        for i, (r, out) in enumerate(zip(rfs, outs, strict=True), 1)
    ]
    runs = [r.finish(timeout=600) for r in running]
    for run in runs:
        assert run.code == 0, run.err
    events = [events_of(run) for run in runs]

    unique = planned_keys(Rfs(tmp_path / "cache-plan"), packages)
    ran = Counter(key for ev in events for key in ran_keys(ev))
    assert set(ran) == unique  # every step ran somewhere ...
    assert all(n == 1 for n in ran.values()), ran  # ... once across the three
    for i, ev in enumerate(events, 1):
        assert all(owner(key, 3) == i for key in ran_keys(ev))  # each ran only its own
        assert not [e for e in ev if e["event"] == "step_deadline"]
    assert any(e["event"] == "step_fetched" for ev in events for e in ev)

    clean = clean_build(tmp_path, packages)
    for name in NAMES:
        image = (clean / f"{name}.ext4").read_bytes()
        for out in outs:
            assert (out / f"{name}.ext4").read_bytes() == image, (out, name)


def test_a_killed_shard_costs_time_never_an_image(
    tmp_path: Path, nginx: Server, docker_client: Any
) -> None:
    packages: list[Path] = []
    for attempt in range(8):  # keys whose steps shard 2 owns some of (random markers)
        packages = family(tmp_path / f"pkgs-{attempt}", uuid.uuid4().hex)
        if any(owner(k, 3) == 2 for k in planned_keys(Rfs(tmp_path / "cache-plan"), packages)):
            break
    rfs = [Rfs(tmp_path / f"cache-{i}", timeout_s=600) for i in (1, 2, 3)]
    outs = [tmp_path / f"out-{i}" for i in (1, 2, 3)]
    for out in outs:
        out.mkdir()
    running = [
        r.start(*shard_args(packages, out, f"{i}/3", nginx.url), "--shard-wait", "5")
        for i, (r, out) in enumerate(zip(rfs, outs, strict=True), 1)
    ]
    victim = running[1]
    try:
        until(lambda: '"step_started"' in "".join(victim.out), "shard 2 starts a step", 300)
        victim.kill()
    finally:
        for container in containers_of(docker_client, victim.run_id):
            container.remove(force=True)  # what a killed build leaves (the next one would)
    runs = [running[0].finish(timeout=600), running[2].finish(timeout=600)]
    for run in runs:
        assert run.code == 0, run.err
    events = [events_of(run) for run in runs]
    late = {e["key"] for ev in events for e in ev if e["event"] == "step_deadline"}
    assert late and all(owner(key, 3) == 2 for key in late)  # shard 2's steps, built late

    clean = clean_build(tmp_path, packages)
    for name in NAMES:
        image = (clean / f"{name}.ext4").read_bytes()
        for out in (outs[0], outs[2]):
            assert (out / f"{name}.ext4").read_bytes() == image, (out, name)


def run0_key(rfs: Rfs, package: Path) -> str:
    """The key of the package's first command, from `rfs plan --json`."""
    plan = rfs("plan", package, "--json")
    assert plan.code == 0, plan.err
    return str(next(s["key"] for s in json.loads(plan.out)["steps"] if s["step"] == "run[0]"))


def test_a_runner_whose_own_step_fails_stops_waiting_for_the_others(
    tmp_path: Path, nginx: Server, docker_client: Any
) -> None:
    """This runner's own command fails while it waits for another shard's step (which never
    comes: the other runner is not started, and its deadline is far off). The wait ends at
    once: the build exits with the failure, builds nothing more, and leaves no container."""
    marker, planner = uuid.uuid4().hex, Rfs(tmp_path / "cache-plan")
    bad = write_package(tmp_path / "bad", build_toml(marker, ['script_inline = "sleep 2; exit 3"']))
    mine = owner(run0_key(planner, bad), 2)
    good = bad
    for n in range(32):  # a command of shard 2's (the content picks the owner)
        good = write_package(tmp_path / f"good{n}", build_toml(marker, [f'command = "touch /{n}"']))
        if owner(run0_key(planner, good), 2) != mine:
            break
    assert good != bad
    out = tmp_path / "out"
    out.mkdir()
    args = shard_args([bad, good], out, f"{mine}/2", nginx.url)
    running = Rfs(tmp_path / "cache").start(*args[:-1], "600")  # --shard-wait 600
    done = running.finish(timeout=120)  # the old code waited the 600 s
    assert done.code == 1, done.err
    events = events_of(done)
    waits = [e for e in events if e["event"] == "step_waiting"]
    assert [e["step"] for e in waits] == [f"{good.name}/run[0]"], events
    assert not [e for e in events if e["event"] in ("step_deadline", "step_fetched")]
    assert "package bad:" in done.err and "exited with code 3" in done.err
    assert containers_of(docker_client, running.run_id) == []
