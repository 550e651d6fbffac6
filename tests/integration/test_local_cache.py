"""The local cache under concurrent builds and clean-up, with the real engine and `rfs`.

Every package carries a unique marker, so its keys and layer tags belong to this test alone.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.run.store import Store
from tests.cachefiles import blobs, disk_bytes, layer_tags, remove_layers
from tests.packages import CACHE_BUILD_TOML, write_package
from tests.rfsrun import Rfs, count_created, rfs

pytestmark = pytest.mark.integration


def make_package(root: Path, name: str) -> Path:
    return write_package(
        root / name,
        CACHE_BUILD_TOML.replace("MARKER", uuid.uuid4().hex),
        {"files/motd": f"{name}\n"},
    )


@pytest.fixture
def cache(tmp_path: Path, docker_client: Any) -> Iterator[Path]:
    path = tmp_path / "cache"
    yield path
    remove_layers(docker_client, path)


def info(cache: Path) -> dict[str, Any]:
    r = rfs("cache", "info", "--json", cache=cache)
    assert r.code == 0, r.err
    return dict(json.loads(r.out))


def test_concurrent_builds_build_each_step_once(
    cache: Path, tmp_path: Path, docker_client: Any
) -> None:
    pkg = make_package(tmp_path, "pkg")
    start_ns = time.time_ns()
    runner = Rfs(cache)
    running = [
        runner.start("build", pkg, "-o", tmp_path / f"out{i}.ext4", new_session=False)
        for i in range(2)
    ]
    results = [r.finish(timeout=300) for r in running]
    for result in results:
        assert result.code == 0, result.err
    created = [count_created(docker_client, r.run_id, start_ns) for r in results]
    # three commands and the base image's export (their changes are laid on it), once
    assert sum(created) == 4, (created, results)
    out0, out1 = (tmp_path / "out0.ext4").read_bytes(), (tmp_path / "out1.ext4").read_bytes()
    assert out0 == out1

    stats = info(cache)
    kinds = {k: v["entries"] for k, v in stats["kinds"].items()}
    assert kinds == {
        "run": 3,
        "diff": 3,
        "base-export": 1,
        "overlays": 1,
        "assemble": 1,
        "ext4-base": 1,
    }
    (export,) = blobs(cache, "base-export")
    (base,) = blobs(cache, "ext4-base")
    diffs = blobs(cache, "diff")
    assert stats["blob_bytes"] == sum(disk_bytes(p) for p in [export, base, *diffs])
    assert stats["kinds"]["base-export"]["bytes"] == disk_bytes(export)
    assert disk_bytes(base) < base.stat().st_size  # sparse, counted by what it allocates
    assert list((cache / "tmp").iterdir()) == []
    # Both outputs are known: a third build to either one does nothing.
    for i in (0, 1):
        why = rfs("plan", pkg, "-o", tmp_path / f"out{i}.ext4", "--explain", cache=cache).out
        again = rfs("build", pkg, "-o", tmp_path / f"out{i}.ext4", cache=cache)
        assert again.code == 0 and "0 step(s) ran" in again.err, f"{why}\n{again.err}"
    assert info(cache)["kinds"]["assemble"]["hits"] == 2


def test_prune_by_age_and_clear_remove_layers_too(
    cache: Path, tmp_path: Path, docker_client: Any
) -> None:
    import docker

    old, new = make_package(tmp_path, "old"), make_package(tmp_path, "new")
    assert rfs("build", old, "-o", tmp_path / "old.ext4", cache=cache).code == 0
    old_tags = layer_tags(cache)
    # An hour passes for "old": each of its entries was last used an hour ago.
    an_hour_ago = Store(cache, clock=lambda: time.time() - 3600)
    for key, _ in an_hour_ago.records():
        an_hour_ago.touch(key)
    an_hour_ago.close()
    r = rfs("build", new, "-o", tmp_path / "new.ext4", cache=cache)
    assert r.code == 0, r.err
    new_tags = sorted(set(layer_tags(cache)) - set(old_tags))
    assert len(old_tags) == len(new_tags) == 3

    pruned = rfs("cache", "prune", "--older-than", "30m", cache=cache)
    assert pruned.code == 0, pruned.err
    # every step of "old" (its commands, their changes, overlays, image); the base image's
    # export and the ext4 base image made of it are the same for "new", which used them now
    assert "dropped 8 entries (3 layer images)" in pruned.out
    assert sorted(layer_tags(cache)) == new_tags

    def present(tag: str) -> bool:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.get(tag)
            return True
        return False

    assert not any(present(t) for t in old_tags)
    assert all(present(t) for t in new_tags)
    # "new" is intact; "old" is built again from scratch.
    again = rfs("build", new, "-o", tmp_path / "new.ext4", cache=cache)
    assert "0 step(s) ran" in again.err, again.err
    (tmp_path / "old.ext4").unlink()
    rebuilt = rfs("build", old, "-o", tmp_path / "old.ext4", cache=cache)
    assert rebuilt.code == 0 and "8 step(s) ran" in rebuilt.err, rebuilt.err

    # --max-size: the least recently used entry with a file goes first, and only as many as
    # needed (sizes are what the files allocate: the base images are sparse)
    files = blobs(cache)  # each package's three diffs; the base's export and base image
    assert len(files) == 8
    total = sum(disk_bytes(p) for p in files)
    smaller = rfs("cache", "prune", "--max-size", str(total - 1), cache=cache)
    assert smaller.code == 0, smaller.err
    assert [p.exists() for p in files] == [False] + [True] * 7

    cleared = rfs("cache", "clear", cache=cache)
    assert cleared.code == 0, cleared.err
    assert info(cache)["entries"] == 0
    assert not any(present(t) for t in old_tags + new_tags)
    assert list((cache / "locks").iterdir()) == []
