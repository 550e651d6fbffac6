"""A registry's token challenge cannot blow up memory, inject headers or pull credentials over
plain http: a real HTTP server on 127.0.0.1 answering the OCI backend's requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from rfs.errors import RemoteCacheError
from rfs.remote.codec import BadObject
from rfs.remote.config import RemoteSettings
from rfs.remote.oci import OciBackend


class _RegistryServer(ThreadingHTTPServer):
    """What the handler answers with, and the Authorization header of each request it saw."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Registry)
        self.seen: list[tuple[str, str | None]] = []
        self.realm = "http://127.0.0.1:PORT/token"
        self.token_answer = b'{"token": "good.token"}'

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading


class _Registry(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RegistryServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token"):
            body = srv.token_answer
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.headers.get("Authorization") == "Bearer good.token":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        realm = srv.realm.replace("PORT", str(srv.server_address[1]))
        self.send_response(401)
        self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def registry() -> Iterator[_RegistryServer]:
    server = _RegistryServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _backend(registry: _RegistryServer) -> OciBackend:
    port = registry.server_address[1]
    return OciBackend(
        f"oci://127.0.0.1:{port}/rfs/cache",
        RemoteSettings(timeout_s=5, connect_timeout_s=2, retries=0),
    )


def test_a_good_token_is_used(registry: _RegistryServer) -> None:
    assert _backend(registry).get_record("0" * 64) is None  # 404 once authenticated
    assert registry.seen[-1][1] == "Bearer good.token"


def test_an_oversized_token_answer_is_not_read_whole(registry: _RegistryServer) -> None:
    """A good token padded to 8 MiB: read whole, it would work; it must be refused unread."""
    registry.token_answer = b'{"token": "good.token", "pad": "' + b"a" * (8 << 20) + b'"}'
    with pytest.raises(BadObject, match="too large"):
        _backend(registry).get_record("0" * 64)


@pytest.mark.parametrize("token", ['"evil\\r\\nX-Injected: 1"', "123", '""', '"a b"'])
def test_a_token_that_is_not_a_plain_word_is_refused(registry: _RegistryServer, token: str) -> None:
    registry.token_answer = b'{"token": ' + token.encode() + b"}"
    with pytest.raises(RemoteCacheError):
        _backend(registry).get_record("0" * 64)  # the 401 stands: an error, not a header
    assert all(auth is None for _, auth in registry.seen)


def test_credentials_never_go_to_a_plain_http_realm_of_a_tls_registry() -> None:
    backend = OciBackend(
        "oci://user:secret@registry.example/rfs/cache",
        RemoteSettings(timeout_s=1, connect_timeout_s=1, retries=0),
    )

    challenge = requests.Response()
    challenge.status_code = 401
    challenge.headers["WWW-Authenticate"] = 'Bearer realm="http://127.0.0.1:9/token"'
    assert backend._authenticate(challenge) is False
