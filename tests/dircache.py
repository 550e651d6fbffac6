"""A base-image cache kept in a plain directory, for tests of the ext4 routes (the build keeps
its base images in its store: rfs.run.baseimages)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from rfs.host.hashing import digest_json


class DirCache:
    """Base images and their side directories under `root`; `made` counts the images put."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made = 0
        root.mkdir(exist_ok=True)

    def key(self, identity: Mapping[str, object]) -> str:
        return digest_json(dict(identity))

    def seed(self, identity: Mapping[str, object]) -> bytes:
        return bytes.fromhex(self.key(identity))[:32]

    def get(self, key: str) -> Path | None:
        path = self.root / key
        return path if path.exists() else None

    @contextlib.contextmanager
    def put(self, key: str) -> Iterator[Path]:
        tmp = self.root / f"{key}.part"
        yield tmp
        tmp.rename(self.root / key)
        self.made += 1

    def building(self, key: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # one test process, one maker

    def side_dir(self, key: str) -> Path:
        return self.root / "side" / key
