"""Shared remote caches, end to end: real nginx (WebDAV) and a real OCI registry started from
cache/, the real engine, the `rfs` command. Runner A builds and pushes; runner B has an empty
cache directory and none of A's layer images in the engine.

Containers are counted from the engine's events (by each build's run label), independently of
what rfs reports. Every package carries a unique marker, so its step keys (and layer tags) are
this test's alone and removing them cannot disturb anyone else's build.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cachefiles import remove_layers
from tests.cacheservers import Server, ServerMissing, start_nginx, start_registry
from tests.conftest import require_or_skip
from tests.fsinspect import list_ext4, read_ext4_file
from tests.packages import CACHE_BUILD_TOML, write_package
from tests.rfsrun import Rfs as Runner
from tests.rfsrun import besides_overlays, count_created
from tests.rfsrun import rfs as rfs_once

pytestmark = pytest.mark.integration


@dataclass
class Result:
    code: int
    err: str
    created: int  # containers the engine created for this build
    seconds: float
    out: str = ""

    def ran(self) -> list[str]:
        """Step ids rfs reports as run."""
        return [ln.split()[1] for ln in self.err.splitlines() if ln.strip().startswith("done ")]

    def fetched(self) -> list[str]:
        """Step ids rfs reports as downloaded from a remote cache."""
        return [ln.split()[1] for ln in self.err.splitlines() if ln.strip().startswith("fetched ")]

    def warnings(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if "warning:" in ln]


Rfs = Callable[..., Result]


@pytest.fixture
def rfs(docker_client: Any, tmp_path: Path) -> Iterator[Rfs]:
    """Run `rfs` with a cache directory of its own per runner name; remove layer tags after."""
    runners: dict[str, Runner] = {}
    no_config = {"RFS_CONFIG": str(tmp_path / "no-config.toml")}

    def run(*args: str | Path, runner: str = "a", env: dict[str, str] | None = None) -> Result:
        if runner not in runners:
            runners[runner] = Runner(tmp_path / f"cache-{runner}", env=no_config)
        start_ns = time.time_ns()
        done = runners[runner](*args, env=env)
        (tmp_path / "no-config.toml").touch()
        created = count_created(docker_client, done.run_id, start_ns)
        return Result(done.code, done.err, created, done.seconds, done.out)

    (tmp_path / "no-config.toml").touch()
    yield run
    for runner in runners.values():
        remove_layers(docker_client, runner.cache)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return write_package(
        tmp_path / "pkg",
        CACHE_BUILD_TOML.replace("MARKER", uuid.uuid4().hex),
        {"files/motd": "hello from the cache\n"},
    )


def _server(start: Callable[[], Server]) -> Iterator[Server]:
    try:
        server = start()
    except ServerMissing as exc:
        require_or_skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nginx() -> Iterator[Server]:
    yield from _server(start_nginx)


@pytest.fixture
def registry() -> Iterator[Server]:
    yield from _server(start_registry)


@pytest.fixture(params=["http", "oci"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    yield from _server(start_nginx if request.param == "http" else start_registry)


def file_in(image: Path, path: str) -> bytes:
    return read_ext4_file(image, list_ext4(image)[path].inode)


def edit_last_command(package: Path) -> None:
    toml = package / "build.toml"
    toml.write_text(toml.read_text().replace('"touch /srv/data/three"', '"touch /srv/data/THREE"'))


@pytest.fixture(params=["unsigned", "signed"])
def signing(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """(A's extra flags, B's environment): none, or A signs and B trusts only A's key."""
    if request.param == "unsigned":
        return [], {}
    key = tmp_path / "ci.key"
    keygen = rfs_once("cache", "keygen", key, cache=tmp_path / "keygen-cache")
    assert keygen.code == 0, keygen.err
    public = keygen.out.strip()
    return ["--cache-sign-key", str(key)], {"RFS_CACHE_TRUST": public}


def test_fresh_runner_reuses_a_warm_remote_cache(
    rfs: Rfs,
    package: Path,
    tmp_path: Path,
    server: Server,
    docker_client: Any,
    signing: tuple[list[str], dict[str, str]],
) -> None:
    sign, trust = signing
    out_a, out_b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    a = rfs("build", package, "-o", out_a, "--cache-to", server.url, *sign, runner="a")
    assert a.code == 0, a.err
    assert sorted(besides_overlays(a)) == sorted(
        ["run[0]", "diff[0]", "run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"]
    )
    assert "pushed   8 step(s)" in a.err

    # Runner B: empty cache directory, A's layer images gone from the engine. Its plan looks
    # in the remote cache as the build will, without downloading anything.
    remove_layers(docker_client, tmp_path / "cache-a")
    plan = rfs("plan", package, "-o", out_b, "--cache-from", server.url, runner="b", env=trust)
    assert plan.code == 0, plan.err
    assert re.search(
        r"^cached  assemble .*\n +from: " + re.escape(server.url) + "$", plan.out, re.M
    ), plan.out
    assert plan.out.endswith("0 step(s) to run, 1 to download from a remote cache\n"), plan.out
    assert not out_b.exists()
    b = rfs("build", package, "-o", out_b, "--cache-from", server.url, runner="b", env=trust)
    assert b.code == 0, b.err
    assert (b.ran(), b.created, b.fetched()) == ([], 0, ["assemble"])  # only the image
    assert ("signed by ci" in b.err) == bool(trust), b.err
    assert out_b.read_bytes() == out_a.read_bytes()
    assert b.warnings() == []

    # B with the last command changed: it alone runs, on a layer downloaded from the cache.
    edit_last_command(package)
    c = rfs("build", package, "-o", out_b, "--cache-from", server.url, runner="b", env=trust)
    assert c.code == 0, c.err
    assert c.warnings() == []
    # the layer it runs on, what the earlier commands changed, the overlays
    assert sorted(c.fetched()) == ["diff[0]", "diff[1]", "overlays", "run[1]"]
    assert c.ran() == ["run[2]", "diff[2]", "assemble"]
    assert c.created == 2  # the changed command, and the base image's export (kept locally)
    assert file_in(out_b, "/srv/data/two") == b""
    assert "/srv/data/THREE" in list_ext4(out_b)
    assert file_in(out_b, "/etc/motd") == b"hello from the cache\n"


def _records(server: Server) -> dict[str, dict[str, Any]]:
    """nginx's stored records (their JSON bodies) by step id."""
    found = {}
    for path in (server.data / "ac").iterdir():
        doc = json.loads(path.read_bytes().partition(b"\n\n")[2])
        found[doc["step"]] = doc
    return found


def test_corrupt_and_partial_objects_are_misses(
    rfs: Rfs, package: Path, tmp_path: Path, nginx: Server, docker_client: Any
) -> None:
    out_a, out_b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    a = rfs("build", package, "-o", out_a, "--cache-to", nginx.url, runner="a")
    assert a.code == 0, a.err
    remove_layers(docker_client, tmp_path / "cache-a")
    records = _records(nginx)
    image = nginx.data / "cas" / records["assemble"]["image"]["object"]["sha256"]
    export = nginx.data / "cas" / records["diff[2]"]["diff"]["object"]["sha256"]
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    image.write_bytes(bytes(data))
    with export.open("r+b") as f:  # a partial upload
        f.truncate(export.stat().st_size // 2)

    b = rfs("build", package, "-o", out_b, "--cache-from", nginx.url, runner="b")
    assert b.code == 0, b.err
    warnings = "\n".join(b.warnings())
    assert "does not match its blake3 hash" in warnings and "assemble will be rebuilt" in warnings
    assert "truncated" in warnings and "diff[2] will be rebuilt" in warnings
    # the next good copies upstream
    assert sorted(b.fetched()) == ["diff[0]", "diff[1]", "overlays", "run[2]"]
    assert b.ran() == ["diff[2]", "assemble"]
    assert b.created == 1  # the base image's export; no command ran
    assert out_b.read_bytes() == out_a.read_bytes()
    assert "Traceback" not in b.err


def test_unreachable_server_warns_and_builds_locally(
    rfs: Rfs, package: Path, tmp_path: Path, nginx: Server
) -> None:
    nginx.stop(remove=False)
    out = tmp_path / "out.ext4"
    r = rfs("build", package, "-o", out, "--cache-from", nginx.url, "--cache-to", nginx.url)
    assert r.code == 0, r.err
    assert sorted(besides_overlays(r)) == sorted(
        ["run[0]", "diff[0]", "run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"]
    )
    assert len(r.warnings()) == 1 and "connection refused" in r.warnings()[0], r.err
    assert "/srv/data/three" in list_ext4(out)
    assert r.seconds < 60

    edit_last_command(package)
    strict = rfs("build", package, "-o", out, "--cache-from", nginx.url, "--cache-strict")
    assert strict.code == 3, strict.err
    assert "connection refused" in strict.err and "Traceback" not in strict.err
    assert strict.created == 0


def test_branch_scope_writes_apart_and_reads_main(
    rfs: Rfs, package: Path, tmp_path: Path, registry: Server, docker_client: Any
) -> None:
    url = registry.url
    main = rfs("build", package, "-o", tmp_path / "main.ext4", "--cache-to", url, runner="main")
    assert main.code == 0, main.err

    # A branch build with the last command changed: reads main's layers, writes its scope.
    edit_last_command(package)
    env = {"RFS_CACHE_TO": url, "RFS_CACHE_SCOPE": "feature/x"}  # the environment works too
    remove_layers(docker_client, tmp_path / "cache-main")
    branch = rfs("build", package, "-o", tmp_path / "b.ext4", runner="branch", env=env)
    assert branch.code == 0, branch.err
    assert sorted(branch.fetched()) == ["diff[0]", "diff[1]", "overlays", "run[1]"]
    assert branch.ran() == ["run[2]", "diff[2]", "assemble"]
    remove_layers(docker_client, tmp_path / "cache-branch")

    # Main's scope did not receive the branch's steps ...
    other = rfs("build", package, "-o", tmp_path / "o.ext4", "--cache-from", url, runner="o")
    assert other.code == 0, other.err
    assert other.ran() == ["run[2]", "diff[2]", "assemble"]
    remove_layers(docker_client, tmp_path / "cache-o")
    # ... and a reader of the branch's scope gets the image without running anything.
    again = rfs(
        "build",
        package,
        "-o",
        tmp_path / "again.ext4",
        "--cache-from",
        url,
        "--cache-scope",
        "feature/x",
        runner="again",
    )
    assert again.code == 0, again.err
    assert (again.ran(), again.created, again.fetched()) == ([], 0, ["assemble"])
    assert (tmp_path / "again.ext4").read_bytes() == (tmp_path / "b.ext4").read_bytes()
