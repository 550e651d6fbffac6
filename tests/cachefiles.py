"""What a test can see of an rfs cache directory, through the store's own records."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rfs.run.store import Store


def blobs(cache: Path, kind: str | None = None) -> list[Path]:
    """The blob files of the entries of `kind` ("export", "ext4-base"; None: any), least
    recently used first."""
    store = Store(cache)
    try:
        found = sorted(
            (float(r.get("last_used", 0)), key)
            for key, r in store.records()
            if kind in (None, r.get("kind")) and (cache / "blobs" / key).is_file()
        )
    finally:
        store.close()
    return [cache / "blobs" / key for _, key in found]


def layer_tags(cache: Path) -> list[str]:
    """The layer image tags the records of a cache directory name."""
    if not (cache / "index").exists():
        return []
    store = Store(cache)
    try:
        return [str(r["tag"]) for _, r in store.records() if r.get("kind") in ("run", "dockerfile")]
    finally:
        store.close()


def _is_tar(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def export_blob(cache: Path) -> Path:
    """The export of the last command's container in `cache`: its largest tarball (an ext4
    build beside it adds the base image's export and the commands' layer diffs, which hold
    less). Told apart by content, so a cache another user owns is only read."""
    found = [p for p in (cache / "blobs").iterdir() if p.is_file() and _is_tar(p)]
    assert found, f"no tarball in {cache}"
    return max(found, key=lambda p: p.stat().st_size)


def disk_bytes(path: Path) -> int:
    """What a file occupies on disk (the store counts sparse images this way)."""
    return path.stat().st_blocks * 512


def remove_layers(docker_client: Any, cache: Path) -> None:
    """Remove a cache's layer images from the engine (a runner with an empty engine)."""
    import docker

    for tag in layer_tags(cache):
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)
