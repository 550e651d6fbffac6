"""The SDK-free image lookup answers exactly what the full engine client answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from rfs.engine import Engine, default_uri
from rfs.engine.lite import Unavailable, image_id


def test_lite_lookup_matches_the_engine(docker_engine: Engine, busybox_image: str) -> None:
    uri = getattr(docker_engine, "base_url", None) or default_uri(docker_engine.name)
    assert image_id(uri, busybox_image) == docker_engine.image_id(busybox_image)
    full = docker_engine.image_id(busybox_image)
    assert full is not None and image_id(uri, full) == full
    assert image_id(uri, "rfs-test/no-such-image:1") is None


def test_lite_lookup_declines_what_it_cannot_answer(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        image_id("tcp://127.0.0.1:2375", "x:1")
    with pytest.raises(Unavailable):
        image_id("unix:///nonexistent/docker.sock", "x:1")
