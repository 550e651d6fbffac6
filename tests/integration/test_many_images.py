"""`rfs build PKG... --output-dir DIR -j N` on the real engine: several packages as one graph.

The packages of a family share a command prefix: its steps run once (counted in the engine's
own events), each image equals the one a single-package build makes, byte for byte; `-j`
overlaps the steps of different packages (their `--json` events' times) and `-j 1` does not;
a failure in one package names it and keeps what the others finished; an interrupt leaves
nothing behind.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.cachefiles import remove_layers
from tests.cacheservers import ServerMissing, start_nginx
from tests.conftest import require_or_skip
from tests.events import validate_events
from tests.packages import build_toml, write_package
from tests.rfsrun import IsolatedRfs, Rfs, count_created

pytestmark = pytest.mark.integration

SHARED = ['command = "touch /shared-one"', 'command = "touch /shared-two"']


def family(root: Path, marker: str, own: dict[str, str], engine_toml: str = "") -> list[Path]:
    """One package per `own` item (name -> its last command), all starting with SHARED."""
    return [
        write_package(
            root / name,
            build_toml(marker, [*SHARED, last], size_mib=16, container=engine_toml),
        )
        for name, last in own.items()
    ]


def intervals(events: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Step -> (started, ended) of every step that ran, from the JSON events."""
    started = {e["step"]: e["time"] for e in events if e["event"] == "step_started"}
    return {
        e["step"]: (started[e["step"]], e["time"])
        for e in events
        if e["event"] in ("step_finished", "step_failed")
    }


def overlapping(spans: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """The pairs of steps that ran at the same time."""
    names = sorted(spans)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    ]


def test_shared_steps_run_once_and_images_equal_single_builds(
    tmp_path: Path, engine_client: Any, engine_toml: str
) -> None:
    marker = uuid.uuid4().hex
    own = {name: f'command = "touch /own-{name}"' for name in ("web", "db", "cache")}
    packages = family(tmp_path / "pkgs", marker, own, engine_toml)
    out = tmp_path / "out"
    out.mkdir()
    rfs = Rfs(tmp_path / "cache", timeout_s=600)
    start_ns = time.time_ns()
    together = rfs("build", *packages, "--output-dir", out, "-j", "2")
    assert together.code == 0, together.err
    assert together.out.split() == [str(out / f"{name}.ext4") for name in own]
    ran = together.ran()
    # run[0] and run[1] once for the three packages, run[2] once each.
    assert sorted(s for s in ran if "/run[" in s) == sorted(
        ["web/run[0]", "web/run[1]", "web/run[2]", "db/run[2]", "cache/run[2]"]
    ), together.err
    created_together = count_created(engine_client, together.run_id, start_ns)

    singles = 0
    for package in packages:
        alone = Rfs(tmp_path / f"cache-{package.name}", timeout_s=600)
        start_ns = time.time_ns()
        image = tmp_path / f"{package.name}-alone.ext4"
        single = alone("build", package, "-o", image)
        assert single.code == 0, single.err
        singles += count_created(engine_client, single.run_id, start_ns)
        assert image.read_bytes() == (out / f"{package.name}.ext4").read_bytes(), package.name
    # The engine saw the two shared commands' containers, and the base image's export their
    # changes are laid on, once instead of three times.
    assert created_together == singles - 3 * 2, (created_together, singles)

    again = rfs("build", *packages, "--output-dir", out)
    assert again.code == 0 and again.ran() == [], again.err


def test_jobs_overlap_steps_and_one_job_does_not(tmp_path: Path, docker_client: Any) -> None:
    del docker_client  # the engine must be there
    marker = uuid.uuid4().hex
    own = {name: 'command = "sleep 2"' for name in ("left", "right")}
    # Own first commands (no shared prefix), so the two chains are independent.
    packages = [
        write_package(
            tmp_path / "pkgs" / name,
            build_toml(f"{marker}-{name}", [last, 'command = "touch /done"'], size_mib=16),
        )
        for name, last in own.items()
    ]
    seen: dict[str, list[tuple[str, str]]] = {}
    for jobs in ("2", "1"):
        out = tmp_path / f"out-{jobs}"
        out.mkdir()
        rfs = Rfs(tmp_path / f"cache-{jobs}", timeout_s=600)
        run = rfs("build", *packages, "--output-dir", out, "-j", jobs, "--json")
        assert run.code == 0, run.err
        events = [json.loads(line) for line in run.out.splitlines()]
        validate_events(events)
        seen[jobs] = overlapping(intervals(events))
    assert ("left/run[0]", "right/run[0]") in seen["2"], seen
    assert seen["1"] == [], seen["1"]


def test_a_failure_names_its_package_and_the_rest_stays_cached(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    own = {"good": 'command = "touch /own-good"', "bad": 'command = "false"'}
    packages = family(tmp_path / "pkgs", marker, own)
    out = tmp_path / "out"
    out.mkdir()
    rfs = Rfs(tmp_path / "cache", timeout_s=600)
    failed = rfs("build", *packages, "--output-dir", out, "-j", "2")
    assert failed.code == 1, failed.err
    assert "FAILED   bad/run[2]" in failed.err
    assert failed.last_line.startswith("rfs: error: package bad: step run[2]"), failed.err
    assert "Traceback" not in failed.err
    ran_before = set(failed.ran())
    assert {"good/run[0]", "good/run[1]"} <= ran_before

    write_package(packages[1], build_toml(marker, [*SHARED, 'command = "true"'], size_mib=16))
    fixed = rfs("build", *packages, "--output-dir", out, "-j", "2")
    assert fixed.code == 0, fixed.err
    # What finished before the failure is cached now; only what did not is left to run.
    assert not ran_before & set(fixed.ran()), (ran_before, fixed.ran())
    assert "bad/run[2]" in fixed.ran()
    assert (out / "good.ext4").is_file() and (out / "bad.ext4").is_file()


def test_names_and_outputs_are_checked_before_anything_runs(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    one = write_package(tmp_path / "a" / "web", build_toml(marker, SHARED))
    two = write_package(tmp_path / "b" / "web", build_toml(marker, SHARED))
    out = tmp_path / "out"
    out.mkdir()
    rfs = Rfs(tmp_path / "cache")
    same = rfs("build", one, two, "--output-dir", out)
    assert same.code == 2 and "both named 'web'" in same.err, same.err
    no_dir = rfs("build", one, tmp_path / "b" / "web")
    assert no_dir.code == 2 and "--output-dir" in no_dir.err, no_dir.err
    both = rfs("build", one, "-o", tmp_path / "x.ext4", "--output-dir", out)
    assert both.code == 2 and "not both" in both.err, both.err
    assert not (tmp_path / "cache").exists() or not list(out.iterdir())


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_interrupt_stops_every_running_step_and_leaves_nothing(
    tmp_path: Path, api: Any, sig: int, group: bool
) -> None:
    rfs = IsolatedRfs(tmp_path, api)
    marker = uuid.uuid4().hex
    slow = 'script_inline = "echo started; sleep 60"'
    packages = [
        write_package(tmp_path / "pkgs" / name, build_toml(f"{marker}-{name}", [slow]))
        for name in ("left", "right")
    ]
    out = tmp_path / "out"
    out.mkdir()
    stopped = rfs.interrupt(
        ["build", *packages, "--output-dir", out, "-j", "2"],
        lambda err: "left/run[0] | started" in err and "right/run[0] | started" in err,
        sig,
        group=group,
    )
    assert stopped.code == 130, stopped.err
    assert stopped.last_line.startswith(
        f"rfs: interrupted by {signal.Signals(sig).name} during "
    ), stopped.err
    assert "left/run[0]" in stopped.last_line and "right/run[0]" in stopped.last_line
    assert stopped.seconds < 50  # the commands were stopped, not waited for
    rfs.assert_clean(stopped, out / "left.ext4", None)
    assert list(out.iterdir()) == []


def test_plan_and_graph_show_one_graph(tmp_path: Path, docker_client: Any) -> None:
    del docker_client  # planning asks the engine for the base image's ID
    marker = uuid.uuid4().hex
    own = {name: f'command = "touch /own-{name}"' for name in ("web", "db")}
    packages = family(tmp_path / "pkgs", marker, own)
    rfs = Rfs(tmp_path / "cache")
    plan = rfs("plan", *packages, "--output-dir", tmp_path)
    assert plan.code == 0, plan.err
    assert plan.out.splitlines()[0] == f"web: {tmp_path / 'web.ext4'}"
    assert "shared: runs once, as web/run[0]" in plan.out
    # base is cached; run[0], run[1], their diffs and the overlays shared; run[2], diff[2],
    # assemble each.
    assert plan.out.splitlines()[-1] == "11 step(s) to run for 2 images (5 shared)", plan.out
    as_json = [json.loads(line) for line in rfs("plan", *packages, "--json").out.splitlines()]
    validate_events(as_json)
    assert [e["steps"][1]["step"] for e in as_json] == ["web/run[0]", "db/run[0]"]
    dot = rfs("graph", *packages)
    assert dot.code == 0, dot.err
    assert '"web/run[1]" -> "db/run[2]";' in dot.out and '"db/run[0]"' not in dot.out
    assert rfs("graph", *packages, "--image", tmp_path / "x.ext4").code == 2


def test_several_packages_push_to_and_build_from_a_remote_cache(
    tmp_path: Path, docker_client: Any
) -> None:
    """Runner A builds the family with --cache-to; runner B (empty cache, A's layers gone from
    the engine) builds it with --cache-from, runs nothing and makes the same images."""
    try:
        server = start_nginx()
    except ServerMissing as exc:
        require_or_skip(str(exc))
    try:
        marker = uuid.uuid4().hex
        own = {name: f'command = "touch /own-{name}"' for name in ("web", "db")}
        packages = family(tmp_path / "pkgs", marker, own)
        outs = {runner: tmp_path / f"out-{runner}" for runner in ("a", "b")}
        caches = {runner: tmp_path / f"cache-{runner}" for runner in ("a", "b")}
        for out in outs.values():
            out.mkdir()
        a = Rfs(caches["a"], timeout_s=600)(
            "build", *packages, "--output-dir", outs["a"], "-j", "2", "--cache-to", server.url
        )
        assert a.code == 0, a.err
        remove_layers(docker_client, caches["a"])
        b = Rfs(caches["b"], timeout_s=600)(
            "build", *packages, "--output-dir", outs["b"], "-j", "2", "--cache-from", server.url
        )
        assert b.code == 0, b.err
        assert b.ran() == [], b.err
        for name in own:
            assert (outs["a"] / f"{name}.ext4").read_bytes() == (
                outs["b"] / f"{name}.ext4"
            ).read_bytes()
    finally:
        server.stop()
