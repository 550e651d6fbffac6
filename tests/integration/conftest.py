"""Fixtures for the end-to-end build tests: SDK clients and derived base images.

`docker_client` is Docker's, always; `engine_client` is the SDK client of the engine under test
(`engine_kind`: Docker, then Podman), and `engine_toml` the `[container]` lines selecting it in
a build script. The derived images (`busybox_v2`, `caps_image`) exist in the engine under test.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from rfs.engine import Engine
from tests.cachefiles import layer_tags
from tests.conftest import engine_url, require_or_skip
from tests.constants import BUSYBOX as BASE
from tests.rfsrun import DOCKER_URI, LAYER_CACHES


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure here means: no engine to test against
        require_or_skip(f"Docker engine unreachable: {exc}")
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        require_or_skip(f"{BASE} missing: run scripts/make-base-images.sh")
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine_client(docker_engine: Engine) -> Iterator[Any]:
    """The docker SDK client of the engine under test (Podman through its compat socket)."""
    docker = pytest.importorskip("docker")
    client = docker.DockerClient(base_url=engine_url(docker_engine), version="1.40")
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        require_or_skip(f"{BASE} missing in {docker_engine.name}: run scripts/make-base-images.sh")
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine_toml(engine_kind: str) -> str:
    """`[container]` lines that make a build script use the engine under test."""
    return f'engine = "{engine_kind.capitalize()}"\n'


def _remove_image(client: Any, tag: str) -> None:
    """Remove a test image; already gone (a cleanup elsewhere got to it) is fine."""
    import docker

    with contextlib.suppress(docker.errors.NotFound):
        client.images.remove(tag, force=True)


def _derive(client: Any, tag: str, files: dict[str, tuple[bytes, dict[str, str]]]) -> str:
    """Commit an image from BASE with `files` added (with optional PAX records, e.g. xattrs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, pax) in files.items():
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(data)
            info.mode = 0o755
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    container = client.containers.create(BASE, command=["/bin/true"], labels={"org.rfs.test": "1"})
    try:
        container.put_archive("/", buf.getvalue())
        container.commit(*tag.split(":"))
    finally:
        container.remove(force=True)
    return tag


@pytest.fixture(scope="session")
def busybox_v2(engine_client: Any) -> Iterator[str]:
    """A second base image, different from BASE by one file."""
    tag = _derive(engine_client, "rfs-test-tmp/busybox:v2", {"/etc/busybox-v2": (b"v2\n", {})})
    yield tag
    _remove_image(engine_client, tag)


# cap_net_raw+ep as the kernel stores it (vfs_cap_data revision 2)
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@contextlib.contextmanager
def capped_base(client: Any, tag: str) -> Iterator[str]:
    """BASE plus /usr/bin/capped carrying cap_net_raw, committed as `tag` for the block."""
    pax = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("latin-1")}
    made = _derive(client, tag, {"/usr/bin/capped": (b"#!/bin/sh\n", pax)})
    try:
        yield made
    finally:
        client.images.remove(made, force=True)


@pytest.fixture(scope="session")
def caps_image(engine_client: Any) -> Iterator[str]:
    """A base image holding /usr/bin/ping-like file with security.capability set."""
    pax = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("latin-1")}
    tag = _derive(
        engine_client, "rfs-test-tmp/busybox:caps", {"/usr/bin/capped": (b"#!/bin/sh\n", pax)}
    )
    yield tag
    _remove_image(engine_client, tag)


@pytest.fixture(scope="module")
def api() -> Iterator[Any]:
    """A docker APIClient of the Docker engine (RFS_TEST_ENGINE_URI, or the default socket)
    for the tests of IsolatedRfs; at the end, removes the layer images of their caches."""
    docker = pytest.importorskip("docker")
    client = docker.APIClient(base_url=DOCKER_URI, version="1.40")
    try:
        client.ping()
        client.inspect_image(BASE)
    except Exception as exc:  # no engine or no base image: nothing here can run
        require_or_skip(f"these tests need the Docker engine and {BASE}: {exc}")
    yield client

    for cache in LAYER_CACHES:
        for tag in layer_tags(cache):
            with contextlib.suppress(docker.errors.APIError):
                client.remove_image(tag, force=True)
    LAYER_CACHES.clear()
    client.close()
