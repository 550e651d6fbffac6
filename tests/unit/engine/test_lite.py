"""rfs/engine/lite.py (and the shortcut of rfs/run/basefacts.py that uses it) against an
engine API served in-process on a unix socket of the test's own: no engine involved."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rfs.engine.lite import (
    API_VERSION,
    Unavailable,
    engine_version,
    image_facts,
    image_id,
    platform_of,
)
from rfs.run.basefacts import quick_engine_facts
from rfs.script.package import load
from tests.packages import write_package

IMAGE_ID = "sha256:" + "ab" * 32


class FakeApi:
    """Answers GETs by path: (status, body) from `answers`, 404 for anything else."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.uri = f"unix://{sock}"
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.asked: list[str] = []
        api = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = self.rfile.readline().decode()
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                target = request.split()[1]
                api.asked.append(target)
                status, body = api.answers.get(target, (404, b'{"message": "no such"}'))
                if status == 0:  # not HTTP at all
                    self.wfile.write(body)
                    return
                self.wfile.write(f"HTTP/1.0 {status} X\r\n\r\n".encode() + body)

        self.server = socketserver.ThreadingUnixStreamServer(str(sock), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def answer(self, target: str, document: object, status: int = 200) -> None:
        self.answers[f"/v{API_VERSION}{target}"] = (status, json.dumps(document).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApi]:
    server = FakeApi(tmp_path / "engine.sock")
    yield server
    server.close()


def test_image_facts_and_version(api: FakeApi) -> None:
    api.answer(
        "/images/fake/base:1/json",
        {"Id": IMAGE_ID, "Os": "linux", "Architecture": "arm64", "Variant": "v8"},
    )
    api.answer("/images/podman:1/json", {"Id": "cd" * 32, "Os": "linux", "Architecture": "amd64"})
    api.answer("/version", {"Version": "20.10.24+dfsg1"})
    assert image_facts(api.uri, "fake/base:1") == (IMAGE_ID, "linux/arm64/v8")
    assert image_id(api.uri, "podman:1") == "sha256:" + "cd" * 32  # Podman's bare hex
    assert image_id(api.uri, "missing:1") is None  # 404
    assert engine_version(api.uri) == "20.10.24+dfsg1"
    assert f"/v{API_VERSION}/images/missing:1/json" in api.asked


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"message": "boom"}'),  # an error
        (200, b"not json"),
        (200, b"[1, 2]"),  # not an object
        (200, b'{"Os": "linux"}'),  # no Id
        (0, b"garbage without a status line"),
    ],
)
def test_unusual_answers_are_unavailable(api: FakeApi, status: int, body: bytes) -> None:
    api.answers[f"/v{API_VERSION}/images/x:1/json"] = (status, body)
    with pytest.raises(Unavailable):
        image_facts(api.uri, "x:1")


def test_no_version_no_socket_and_no_unix_are_unavailable(api: FakeApi, tmp_path: Path) -> None:
    api.answer("/version", {"Os": "linux"})
    with pytest.raises(Unavailable):
        engine_version(api.uri)
    with pytest.raises(Unavailable):
        engine_version(f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(Unavailable, match="tcp://"):
        engine_version("tcp://127.0.0.1:2375")


def test_platform_of() -> None:
    assert platform_of({"Os": "linux", "Architecture": "amd64"}) == "linux/amd64"
    assert platform_of({"Os": "linux", "Architecture": "arm", "Variant": "v7"}) == "linux/arm/v7"
    assert platform_of({"Os": "linux", "Architecture": "arm", "Variant": ""}) == "linux/arm"
    assert platform_of({"Os": "linux"}) == ""
    assert platform_of({"Os": 1, "Architecture": "amd64"}) == ""


def test_quick_engine_facts_asks_the_socket(api: FakeApi, tmp_path: Path) -> None:
    toml = (
        f'[container]\nimage = {{ name = "fake/base", tag = "1" }}\nconnection_uri = "{api.uri}"\n'
    )
    script = load(write_package(tmp_path / "pkg", toml)).script
    assert quick_engine_facts(script, {}) is None  # the engine has no such image: pull
    api.answer("/images/fake/base:1/json", {"Id": IMAGE_ID, "Os": "linux", "Architecture": "amd64"})
    api.answer("/version", {"Version": "4.3.1"})
    found = quick_engine_facts(script, {})
    assert found is not None
    assert (found.base_id, found.platform, found.engine_version) == (
        IMAGE_ID,
        "linux/amd64",
        "4.3.1",
    )
    api.answers.pop(f"/v{API_VERSION}/version")  # an engine not saying its version
    assert quick_engine_facts(script, {}) is None
