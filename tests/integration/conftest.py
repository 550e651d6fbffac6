"""Fixtures for the end-to-end build tests: the Docker SDK client and derived base images."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_or_skip

BASE = "rfs-test/busybox:1"


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
    container = client.containers.create(BASE, command=["/bin/true"],
                                         labels={"org.rfs.test": "1"})
    try:
        container.put_archive("/", buf.getvalue())
        container.commit(*tag.split(":"))
    finally:
        container.remove(force=True)
    return tag


@pytest.fixture(scope="session")
def busybox_v2(docker_client: Any) -> Iterator[str]:
    """A second base image, different from BASE by one file."""
    tag = _derive(docker_client, "rfs-test-tmp/busybox:v2", {"/etc/busybox-v2": (b"v2\n", {})})
    yield tag
    docker_client.images.remove(tag, force=True)


# cap_net_raw+ep as the kernel stores it (vfs_cap_data revision 2)
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.fixture(scope="session")
def caps_image(docker_client: Any) -> Iterator[str]:
    """A base image holding /usr/bin/ping-like file with security.capability set."""
    pax = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("latin-1")}
    tag = _derive(docker_client, "rfs-test-tmp/busybox:caps",
                  {"/usr/bin/capped": (b"#!/bin/sh\n", pax)})
    yield tag
    docker_client.images.remove(tag, force=True)
