"""The local cache under concurrent builds and clean-up, with the real engine and `rfs`.

Every package carries a unique marker, so its keys and layer tags belong to this test alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cachefiles import blobs, disk_bytes, layer_tags
from tests.integration.test_remote_cache import BUILD_TOML, remove_layers

pytestmark = pytest.mark.integration


def make_package(root: Path, name: str) -> Path:
    pkg = root / name
    (pkg / "files").mkdir(parents=True)
    (pkg / "build.toml").write_text(BUILD_TOML.replace("MARKER", uuid.uuid4().hex))
    (pkg / "files" / "motd").write_text(f"{name}\n")
    return pkg


@pytest.fixture
def cache(tmp_path: Path, docker_client: Any) -> Iterator[Path]:
    path = tmp_path / "cache"
    yield path
    remove_layers(docker_client, path)


def env_for(cache: Path, run_id: str) -> dict[str, str]:
    return {**os.environ, "RFS_CACHE_DIR": str(cache), "RFS_RUN_ID": run_id}


def count_created(docker_client: Any, run_id: str, start_ns: int) -> int:
    events = docker_client.events(
        since=start_ns // 10**9 - 1,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": "create", "label": f"org.rfs.run={run_id}"},
    )
    return sum(1 for e in events if int(e["timeNano"]) >= start_ns)


def rfs(cache: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rfs", *map(str, args)],
        capture_output=True,
        text=True,
        env=env_for(cache, uuid.uuid4().hex),
        check=False,
        timeout=300,
    )


def info(cache: Path) -> dict[str, Any]:
    r = rfs(cache, "cache", "info", "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_concurrent_builds_build_each_step_once(
    cache: Path, tmp_path: Path, docker_client: Any
) -> None:
    pkg = make_package(tmp_path, "pkg")
    start_ns = time.time_ns()
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rfs", "build", str(pkg), "-o", str(tmp_path / f"out{i}.ext4")],
            env=env_for(cache, run_id),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, run_id in enumerate(ids)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    created = [count_created(docker_client, run_id, start_ns) for run_id in ids]
    assert sum(created) == 4, (created, results)  # three commands and one export, once
    out0, out1 = (tmp_path / "out0.ext4").read_bytes(), (tmp_path / "out1.ext4").read_bytes()
    assert out0 == out1

    stats = info(cache)
    kinds = {k: v["entries"] for k, v in stats["kinds"].items()}
    assert kinds == {"run": 3, "export": 1, "overlays": 1, "assemble": 1, "ext4-base": 1}
    (export,) = blobs(cache, "export")
    (base,) = blobs(cache, "ext4-base")
    assert stats["blob_bytes"] == disk_bytes(export) + disk_bytes(base)
    assert stats["kinds"]["export"]["bytes"] == disk_bytes(export)
    assert disk_bytes(base) < base.stat().st_size  # sparse, counted by what it allocates
    assert list((cache / "tmp").iterdir()) == []
    # Both outputs are known: a third build to either one does nothing.
    for i in (0, 1):
        again = rfs(cache, "build", pkg, "-o", tmp_path / f"out{i}.ext4")
        assert again.returncode == 0 and "0 step(s) ran" in again.stderr, again.stderr
    assert info(cache)["kinds"]["assemble"]["hits"] == 2


def test_prune_by_age_and_clear_remove_layers_too(
    cache: Path, tmp_path: Path, docker_client: Any
) -> None:
    import docker

    old, new = make_package(tmp_path, "old"), make_package(tmp_path, "new")
    assert rfs(cache, "build", old, "-o", tmp_path / "old.ext4").returncode == 0
    old_tags = layer_tags(cache)
    time.sleep(1.0)
    boundary = time.time()
    r = rfs(cache, "build", new, "-o", tmp_path / "new.ext4")
    assert r.returncode == 0, r.stderr
    new_tags = sorted(set(layer_tags(cache)) - set(old_tags))
    assert len(old_tags) == len(new_tags) == 3

    age = time.time() - boundary + 0.5  # everything of "old" is older, all of "new" younger
    pruned = rfs(cache, "cache", "prune", "--older-than", f"{age:.1f}s")
    assert pruned.returncode == 0, pruned.stderr
    # every step of "old", and its ext4 base image
    assert "dropped 7 entries (3 layer images)" in pruned.stdout
    assert sorted(layer_tags(cache)) == new_tags

    def present(tag: str) -> bool:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.get(tag)
            return True
        return False

    assert not any(present(t) for t in old_tags)
    assert all(present(t) for t in new_tags)
    # "new" is intact; "old" is built again from scratch.
    again = rfs(cache, "build", new, "-o", tmp_path / "new.ext4")
    assert "0 step(s) ran" in again.stderr, again.stderr
    (tmp_path / "old.ext4").unlink()
    rebuilt = rfs(cache, "build", old, "-o", tmp_path / "old.ext4")
    assert rebuilt.returncode == 0 and "6 step(s) ran" in rebuilt.stderr, rebuilt.stderr

    # --max-size: the least recently used entry with a file goes first, and only as many as
    # needed (sizes are what the files allocate: the base images are sparse)
    files = blobs(cache)  # two exports, two base images
    assert len(files) == 4
    total = sum(disk_bytes(p) for p in files)
    smaller = rfs(cache, "cache", "prune", "--max-size", str(total - 1))
    assert smaller.returncode == 0, smaller.stderr
    assert [p.exists() for p in files] == [False, True, True, True]

    cleared = rfs(cache, "cache", "clear")
    assert cleared.returncode == 0, cleared.stderr
    assert info(cache)["entries"] == 0
    assert not any(present(t) for t in old_tags + new_tags)
    assert list((cache / "locks").iterdir()) == []
