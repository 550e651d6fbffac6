"""rfs/engine/docker_engine.py and rfs/engine/apicalls.py without an engine: the adapter
talks to an engine API served in-process on a unix socket of the test's own, and to sockets
where nothing answers, and words each failure so a person can act on it."""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from rfs.engine import connect
from rfs.errors import EngineError

IMAGE_ID = "sha256:" + "ab" * 32


class Api:
    """GET answers by path (the API version prefix removed); 404 for anything else."""

    def __init__(self, sock: Path) -> None:
        self.uri = f"unix://{sock}"
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.asked: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = re.sub(r"^/v[0-9.]+", "", self.path.split("?")[0])
                api.asked.append(path)
                status, body = api.answers.get(path, (404, b'{"message": "no such thing"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")  # no handler thread outlives the test
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = socketserver.ThreadingUnixStreamServer(str(sock), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def answer(self, path: str, document: object, status: int = 200) -> None:
        self.answers[path] = (status, json.dumps(document).encode())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    server = Api(tmp_path / "engine.sock")
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_an_answering_engine(api: Api) -> None:
    api.answers["/_ping"] = (200, b"OK")
    api.answer("/version", {"Version": "24.0.7"})
    api.answer(
        "/images/fake/base:1/json",
        {"Id": IMAGE_ID, "Size": 1234, "Os": "linux", "Architecture": "arm64", "Variant": "v8"},
    )
    engine = connect("docker", api.uri, timeout_s=5)
    engine.ping()
    assert engine.version() == "24.0.7"
    assert engine.image_id("fake/base:1") == IMAGE_ID
    assert engine.image_size("fake/base:1") == 1234
    assert engine.image_platform("fake/base:1") == "linux/arm64/v8"
    assert engine.has_tag("fake/base:1") and not engine.has_tag("fake/base:2")
    assert engine.image_id("missing:1") is None and engine.image_platform("missing:1") == ""
    assert "/images/missing:1/json" in api.asked


def test_a_socket_that_is_not_an_engine(api: Api) -> None:
    engine = connect("docker", api.uri, timeout_s=5)  # /_ping answers 404
    with pytest.raises(EngineError, match=r"answers, but not as a Docker engine API"):
        engine.ping()
    api.answer("/version", {"message": "boom"}, status=500)
    with pytest.raises(EngineError, match="the Docker engine could not report its version: boom"):
        engine.version()


def test_no_socket(tmp_path: Path) -> None:
    uri = f"unix://{tmp_path}/none.sock"
    with pytest.raises(EngineError) as caught:
        connect("docker", uri, timeout_s=5).ping()
    assert caught.value.message == (
        f"cannot reach the Docker engine at {uri}: no such socket — is dockerd running?"
    )
    assert caught.value.hint == "systemctl start docker"
    with pytest.raises(EngineError) as caught:
        connect("podman", uri, timeout_s=5).ping()
    assert "cannot reach the Podman engine" in caught.value.message
    assert caught.value.hint == "systemctl start podman.socket"


def test_nothing_listening(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # a socket file nobody listens on
        with pytest.raises(EngineError, match="connection refused — is dockerd running"):
            connect("docker", f"unix://{path}", timeout_s=5).ping()


def test_an_engine_that_does_not_answer_in_time(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen(4)  # accepts, never answers
        with pytest.raises(EngineError, match=r"did not answer within 0.3 s while trying to"):
            connect("docker", f"unix://{path}", timeout_s=0.3).version()


class _Files:
    """A CopySource of one small file."""

    def write(self, out: Any, resolve: Any) -> int:
        import io
        import tarfile

        with tarfile.open(fileobj=out, mode="w") as tar:
            info = tarfile.TarInfo("etc/marker")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
        return 1


@pytest.mark.parametrize(
    ("failures", "message", "puts"),
    [
        (["passing bulk input to subprocess: write |1: broken pipe"], None, 2),
        (["broken pipe"] * 2, "could not copy files into the container of step run[0]", 2),
        (["no space left on device"], "no space left on device", 1),
    ],
)
def test_a_copy_into_a_container_is_made_again_once_after_a_broken_pipe(
    api: Api,
    monkeypatch: pytest.MonkeyPatch,
    failures: list[str],
    message: str | None,
    puts: int,
) -> None:
    import docker.errors

    engine: Any = connect("podman", api.uri, timeout_s=5)
    left, put = list(failures), []

    def put_archive(cid: str, path: str, data: Any) -> bool:
        put.append(data.read())
        if left:
            raise docker.errors.APIError(left.pop(0))
        return True

    monkeypatch.setattr(engine._api, "put_archive", put_archive)
    if message is None:
        engine._copy_in("c1", _Files(), "run[0]")
    else:
        with pytest.raises(EngineError, match=re.escape(message)):
            engine._copy_in("c1", _Files(), "run[0]")
    assert len(put) == puts and len(set(put)) == 1 and put[0]  # the whole archive each time


def test_the_container_of_a_step_that_succeeded_is_removed_once_in_the_background(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_discard_soon` does not wait for the removal; `remove_containers` (the build's final
    clean-up) and `remove_image` settle first, so they never find it half-removed."""
    import time

    engine: Any = connect("docker", api.uri, timeout_s=5)
    removed: list[str] = []
    images: list[tuple[str, int]] = []

    def remove_container(cid: str, **_: Any) -> None:
        time.sleep(0.2)  # an engine that takes its time
        removed.append(cid)

    def containers(**_: Any) -> list[dict[str, str]]:
        return [] if "c1" in removed else [{"Id": "c1"}]

    monkeypatch.setattr(engine._api, "remove_container", remove_container)
    monkeypatch.setattr(engine._api, "containers", containers)
    monkeypatch.setattr(engine._api, "remove_image", lambda ref: images.append((ref, len(removed))))
    started = time.monotonic()
    engine._discard_soon("c1")
    assert time.monotonic() - started < 0.1 and removed == []
    assert engine.remove_containers("org.rfs.run=r1") == 0
    assert removed == ["c1"]
    engine._discard_soon("c2")
    engine.remove_image("rfs/layer/x:k")
    assert images == [("rfs/layer/x:k", 2)]  # after c2's removal
    engine.settle()  # nothing left to wait for
    assert removed == ["c1", "c2"]
