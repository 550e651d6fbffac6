"""Making cached steps run again, and what a cache may never mix up: `--no-network`,
`--no-cache`, `--rebuild`, `--pull`, stale (`max_age`) and always-run (`no_cache`) commands, two
caches on one engine, and a package file edited while a command runs. Real engine (Docker)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rfs.run.store import Store
from tests.constants import BUSYBOX
from tests.fsinspect import list_ext4
from tests.packages import write_package
from tests.rfsrun import Rfs, rfs, steps_run

BUILD = """\
[filesystem]
size_mib = 16
[container]
image = { name = "IMAGE_NAME", tag = "IMAGE_TAG" }
[[commands]]
script_inline = "#!/bin/sh\\nls /sys/class/net > /net\\n"
[[commands]]
script_inline = "#!/bin/sh\\ncat /proc/sys/kernel/random/uuid > /stamp\\nEXTRA"
[[commands]]
command = "mkdir -p /made"
[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""
EVERY_STEP = {"run[0]", "run[1]", "run[2]", "diff[0]", "diff[1]", "diff[2]", "overlays", "assemble"}


def package(root: Path, image: str = BUSYBOX, extra: str = "", command1: str = "") -> Path:
    name, tag = image.rsplit(":", 1)
    text = BUILD.replace("IMAGE_NAME", name).replace("IMAGE_TAG", tag).replace("EXTRA", "")
    if command1:
        text = text.replace(
            'command = "mkdir -p /made"\n', f'command = "mkdir -p /made"\n{command1}\n'
        )
    return write_package(root, text + extra, {"files/motd": "hello\n"})


def stamp(image: Path) -> str:
    return read(image, "/stamp")


def read(image: Path, path: str) -> str:
    listing = list_ext4(image)
    assert path in listing, f"{path} not in {image}"
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    return out.stdout.decode()


def plan_runs(pkg: Path, out: Path, cache: Path, *args: str) -> set[str]:
    plan = rfs("plan", pkg, "-o", out, *args, cache=cache)
    assert plan.code == 0, plan.err
    return steps_run(plan.out)


@pytest.fixture(autouse=True)
def _docker(docker_client: Any) -> None:
    """These tests run on Docker (the engine-independent logic is the same on Podman)."""


def test_no_network_is_in_the_key_and_means_no_network(tmp_path: Path) -> None:
    pkg, cache, out = package(tmp_path / "pkg"), tmp_path / "cache", tmp_path / "a.ext4"
    online = rfs("build", pkg, "-o", out, cache=cache)
    assert online.code == 0, online.err
    assert "eth0" in read(out, "/net")
    plan = rfs("plan", pkg, "-o", out, "--no-network", "--explain", cache=cache)
    assert {"run[0]", "run[1]", "run[2]", "diff[2]", "assemble"} <= steps_run(plan.out)
    assert "network changed (True → False)" in plan.out
    offline = rfs("build", pkg, "-o", out, "--no-network", cache=cache)
    assert offline.code == 0, offline.err
    assert read(out, "/net").split() == ["lo"]
    # both results are kept, each under its own key
    assert plan_runs(pkg, out, cache, "--no-network") == set()
    assert "run[0]" not in plan_runs(pkg, tmp_path / "b.ext4", cache)


def test_no_cache_runs_every_step_and_replaces_what_was_cached(tmp_path: Path) -> None:
    pkg, cache, out = package(tmp_path / "pkg"), tmp_path / "cache", tmp_path / "a.ext4"
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    first = stamp(out)
    plan = rfs("plan", pkg, "-o", out, "--no-network", "--no-cache", cache=cache)
    assert steps_run(plan.out) == EVERY_STEP and "why: --no-cache" in plan.out
    again = rfs("build", pkg, "-o", out, "--no-network", "--no-cache", cache=cache)
    assert again.code == 0, again.err
    second = stamp(out)
    assert second != first  # the command ran again (its output is random)
    # the new results replaced the old: the next build is a no-op and keeps them
    assert plan_runs(pkg, out, cache, "--no-network") == set()
    assert stamp(out) == second
    other = tmp_path / "b.ext4"
    assert rfs("build", pkg, "-o", other, "--no-network", cache=cache).code == 0
    assert stamp(other) == second


def test_rebuild_runs_that_step_and_every_step_after_it(tmp_path: Path) -> None:
    pkg, cache, out = package(tmp_path / "pkg"), tmp_path / "cache", tmp_path / "a.ext4"
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    first = stamp(out)
    plan = rfs("plan", pkg, "-o", out, "--no-network", "--rebuild", "run[1]", cache=cache)
    assert steps_run(plan.out) == {"run[1]", "run[2]", "diff[1]", "diff[2]", "assemble"}, plan.out
    assert "why: --rebuild" in plan.out and "run[1] runs again (--rebuild)" in plan.out
    rebuilt = rfs("build", pkg, "-o", out, "--no-network", "--rebuild", "run[1]", cache=cache)
    assert rebuilt.code == 0, rebuilt.err
    assert stamp(out) != first
    assert plan_runs(pkg, out, cache, "--no-network", "--rebuild", "overlays") == {
        "overlays",
        "assemble",
    }
    wrong = rfs("build", pkg, "-o", out, "--rebuild", "run[9]", cache=cache)
    assert wrong.code == 2 and "--rebuild run[9]: no such step" in wrong.err, wrong.err
    assert "Traceback" not in wrong.err


def test_a_stale_command_runs_again_with_what_follows(tmp_path: Path) -> None:
    pkg = package(tmp_path / "pkg", command1='max_age = "1d"')
    cache, out = tmp_path / "cache", tmp_path / "a.ext4"
    # max_age is on commands[2] (run[2]); the stamp of run[1] must stay
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    first = stamp(out)
    assert plan_runs(pkg, out, cache, "--no-network") == set()
    _age_record(cache, "run", "mkdir", days=2)
    plan = rfs("plan", pkg, "-o", out, "--no-network", cache=cache)
    assert steps_run(plan.out) == {"run[2]", "diff[2]", "assemble"}, plan.out
    assert "stale: made 2.0d ago, max_age is 1.0d" in plan.out
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    assert stamp(out) == first  # run[1] was not stale
    assert plan_runs(pkg, out, cache, "--no-network") == set()


def test_an_always_run_command_runs_on_every_build(tmp_path: Path) -> None:
    pkg = package(tmp_path / "pkg")
    text = (pkg / "build.toml").read_text()
    text = text.replace(
        'cat /proc/sys/kernel/random/uuid > /stamp\\n"',
        'cat /proc/sys/kernel/random/uuid > /stamp\\n"\nno_cache = true',
    )
    (pkg / "build.toml").write_text(text)
    cache, out = tmp_path / "cache", tmp_path / "a.ext4"
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    first = stamp(out)
    plan = rfs("plan", pkg, "-o", out, "--no-network", cache=cache)
    assert steps_run(plan.out) == {"run[1]", "run[2]", "diff[1]", "diff[2]", "assemble"}, plan.out
    assert "commands[1].no_cache: runs on every build" in plan.out
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    assert stamp(out) != first


def test_pull_without_a_registry_says_so(tmp_path: Path) -> None:
    pkg, cache, out = package(tmp_path / "pkg"), tmp_path / "cache", tmp_path / "a.ext4"
    pulled = rfs("build", pkg, "-o", out, "--no-network", "--pull", cache=cache)
    assert pulled.code == 3, pulled.err
    assert "--pull: cannot look up base image rfs-test/busybox:1 in its registry" in pulled.err
    assert "build without --pull" in pulled.err and "Traceback" not in pulled.err
    assert not out.exists()


def test_pull_takes_a_moved_tag_from_the_registry(tmp_path: Path, docker_client: Any) -> None:
    from tests.cacheservers import ServerMissing, start_registry

    try:
        registry = start_registry()
    except ServerMissing as exc:
        from tests.conftest import require_or_skip

        require_or_skip(str(exc))
    repo = f"127.0.0.1:{registry.port}/rfs-pull-test"
    pushed: list[str] = []
    try:
        image = docker_client.images.get(BUSYBOX)
        image.tag(repo, "1")
        pushed.append(f"{repo}:1")
        _push(docker_client, repo, "1")
        pkg = package(tmp_path / "pkg", image=f"{repo}:1")
        cache, out = tmp_path / "cache", tmp_path / "a.ext4"
        assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
        # the registry's tag moves to another image; the engine still has the old one
        moved = docker_client.containers.create(image.id, command=["/bin/true"])
        try:
            moved.commit(repo, "1")
        finally:
            moved.remove(force=True)
        _push(docker_client, repo, "1")
        image.tag(repo, "1")  # the local tag back on the old image
        assert plan_runs(pkg, out, cache, "--no-network") == set()
        plan = rfs("plan", pkg, "-o", out, "--no-network", "--pull", "--explain", cache=cache)
        assert {"run[0]", "diff[0]", "assemble"} <= steps_run(plan.out), plan.out
        assert f"image {repo}:1 now resolves to a different ID" in plan.out
        assert rfs("build", pkg, "-o", out, "--no-network", "--pull", cache=cache).code == 0
    finally:
        for tag in pushed:
            with contextlib.suppress(Exception):
                docker_client.images.remove(tag, force=True)
        registry.stop()


def _push(client: Any, repo: str, tag: str) -> None:
    for line in client.api.push(repo, tag, stream=True, decode=True):
        assert "error" not in line, line


def test_two_caches_on_one_engine_keep_their_own_layers(tmp_path: Path) -> None:
    pkg = package(tmp_path / "pkg")
    a, b = tmp_path / "cache-a", tmp_path / "cache-b"
    assert rfs("build", pkg, "-o", tmp_path / "a.ext4", "--no-network", cache=a).code == 0
    assert rfs("build", pkg, "-o", tmp_path / "b.ext4", "--no-network", cache=b).code == 0
    cleared = rfs("cache", "clear", cache=a)
    assert cleared.code == 0, cleared.err
    assert "3 layer images" in cleared.out, cleared.out
    # b's layers are its own: dropping what its last command changed makes it read that
    # again from its layer
    store = Store(b)
    try:
        last = max(
            (k for k, r in store.records() if r.get("kind") == "diff"),
            key=lambda k: len((store.record(k) or {})["chain"]["diffs"]),
        )
        store.drop(last)
    finally:
        store.close()
    assert plan_runs(pkg, tmp_path / "b2.ext4", b, "--no-network") == {"diff[2]", "assemble"}
    assert plan_runs(pkg, tmp_path / "a.ext4", a, "--no-network") == EVERY_STEP


def test_an_edit_while_a_command_runs_is_never_recorded_as_used(tmp_path: Path) -> None:
    """The overlay is edited while the first command runs: the image holds the content the
    keys were computed from, and the next build picks the edit up, as a clean build would."""
    pkg = package(tmp_path / "pkg")
    text = (
        (pkg / "build.toml")
        .read_text()
        .replace(
            "ls /sys/class/net > /net\\n", "ls /sys/class/net > /net\\necho started\\nsleep 3\\n"
        )
    )
    (pkg / "build.toml").write_text(text)
    cache, out = tmp_path / "cache", tmp_path / "a.ext4"
    running = Rfs(cache, env={"CI": "1"}).start(
        "build", pkg, "-o", out, "--no-network", new_session=False
    )
    running.wait_for(lambda err: "started" in err)
    (pkg / "files" / "motd").write_text("edited during the build\n")
    done = running.finish(timeout=120)
    assert done.code == 0, done.err
    assert read(out, "/etc/motd") == "hello\n"  # what was hashed when the build was planned
    assert plan_runs(pkg, out, cache, "--no-network") == {"overlays", "assemble"}
    assert rfs("build", pkg, "-o", out, "--no-network", cache=cache).code == 0
    assert read(out, "/etc/motd") == "edited during the build\n"
    clean = tmp_path / "clean.ext4"
    assert rfs("build", pkg, "-o", clean, "--no-network", cache=tmp_path / "empty").code == 0
    assert read(clean, "/etc/motd") == read(out, "/etc/motd")


def _age_record(cache: Path, kind: str, label_part: str, days: float) -> None:
    """Make the record of the `kind` step whose inputs mention `label_part` look older."""
    store = Store(cache)
    try:
        for key, record in store.records():
            if record.get("kind") == kind and label_part in json.dumps(record.get("inputs")):
                record["created"] = float(record["created"]) - days * 86400
                store.put_record(key, record)
                return
        raise AssertionError(f"no {kind} record mentions {label_part}")
    finally:
        store.close()


def test_a_stale_remote_copy_is_a_miss(tmp_path: Path) -> None:
    """Records carry when their results were made: a runner does not download a result that
    its command's max_age says is stale, and takes the fresh ones it was not made from."""
    from tests.cacheservers import ServerMissing, start_nginx

    try:
        server = start_nginx()
    except ServerMissing as exc:
        from tests.conftest import require_or_skip

        require_or_skip(str(exc))
    try:
        pkg = package(tmp_path / "pkg", command1='max_age = "1d"')
        writer = rfs(
            "build",
            pkg,
            "-o",
            tmp_path / "a.ext4",
            "--no-network",
            "--cache-to",
            server.url,
            cache=tmp_path / "cache-a",
        )
        assert writer.code == 0, writer.err
        fresh = rfs(
            "plan",
            pkg,
            "-o",
            tmp_path / "b.ext4",
            "--no-network",
            "--cache-from",
            server.url,
            cache=tmp_path / "cache-b",
        )
        assert steps_run(fresh.out) == set(), fresh.out
        for path in (server.data / "ac").iterdir():  # the server's records, two days older
            head, _, body = path.read_bytes().partition(b"\n\n")
            doc = json.loads(body)
            fields = doc["fields"]
            fields["created"] -= 2 * 86400
            fields["made_at"] = {k: v - 2 * 86400 for k, v in fields.get("made_at", {}).items()}
            path.write_bytes(head + b"\n\n" + json.dumps(doc).encode())
        plan = rfs(
            "plan",
            pkg,
            "-o",
            tmp_path / "b.ext4",
            "--no-network",
            "--cache-from",
            server.url,
            cache=tmp_path / "cache-b",
        )
        assert steps_run(plan.out) == {"run[2]", "diff[2]", "assemble"}, plan.out
        assert "why: stale: made 2.0d ago, max_age is 1.0d (the remote copy)" in plan.out
        assert "from: " in plan.out  # run[1], made before run[2], still comes from the server
    finally:
        server.stop()
