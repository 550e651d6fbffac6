"""A remote cache server that answers like an attacker: the Bazel HTTP protocol (`ac/`, `cas/`)
served from memory by `http.server` in a thread on 127.0.0.1, with a hook that can replace any
answer (truncate it, stall it, inflate it). Plus helpers to take records apart and put them
back together the way a server could."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# hook(handler, kind, name) -> True if it answered the request itself
Hook = Callable[["Handler", str, str], bool]


class Handler(BaseHTTPRequestHandler):
    """One request to the fake cache."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _target(self) -> tuple[str, str]:
        kind, _, name = self.path.lstrip("/").partition("/")
        return kind, name

    def send(
        self, status: int, body: bytes = b"", length: int | None = None, head: bool = False
    ) -> None:
        """Answer with `body`, declaring `length` bytes (default: the body's)."""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        cache = self.server.cache
        kind, name = self._target()
        cache.requests.append(f"{self.command} {self.path}")
        if cache.hook is not None and not head and cache.hook(self, kind, name):
            return
        store = cache.records if kind == "ac" else cache.objects if kind == "cas" else {}
        if name in store:
            self.send(200, store[name], head=head)
        elif kind == "cas" and cache.any_object is not None:
            self.send(200, cache.any_object, head=head)  # whatever name is asked for
        else:
            self.send(404, head=head)

    def do_PUT(self) -> None:
        cache = self.server.cache
        kind, name = self._target()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        cache.requests.append(f"PUT {self.path}")
        if kind == "ac":
            cache.records[name] = body
        elif kind == "cas":
            cache.objects[name] = body
        self.send(201)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    cache: FakeCache


class FakeCache:
    """The server: `records` (ac/) and `objects` (cas/) by name, and a `hook` for attacks."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.objects: dict[str, bytes] = {}
        self.hook: Hook | None = None
        self.any_object: bytes | None = None
        self.requests: list[str] = []
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.cache = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (requests in progress are abandoned)."""
        self._server.shutdown()
        self._server.server_close()


# -- attacks as answers ----------------------------------------------------------------------


def truncated(handler: Handler, body: bytes) -> None:
    """Promise all of `body`, send half, hang up."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    handler.wfile.flush()
    handler.close_connection = True


def trickled(handler: Handler, body: bytes, every_s: float = 0.3) -> None:
    """Send `body` one byte at a time, each just inside a read time-out."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        for i in range(len(body)):
            handler.wfile.write(body[i : i + 1])
            handler.wfile.flush()
            time.sleep(every_s)
    except OSError:  # the client gave up: what the test wants
        handler.close_connection = True


def endless(handler: Handler, declare: bool, size: int = 24 << 20) -> None:
    """A body of `size` bytes (more than any record may be), declared or chunked."""
    handler.send_response(200)
    if declare:
        handler.send_header("Content-Length", str(size))
    else:
        handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b"{" * 65536
    try:
        for _ in range(size // len(chunk)):
            if declare:
                handler.wfile.write(chunk)
            else:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if not declare:
            handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass
    handler.close_connection = True


# -- records, taken apart ---------------------------------------------------------------------


def split_record(data: bytes) -> tuple[list[bytes], dict[str, Any]]:
    """(header lines, body) of an rfs-remote-2 record."""
    header, _, body = data.partition(b"\n\n")
    return header.split(b"\n"), json.loads(body)


def join_record(header: list[bytes], body: dict[str, Any]) -> bytes:
    """The bytes of a record from its header lines and body."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return b"\n".join(header) + b"\n\n" + text


def unsigned(data: bytes) -> bytes:
    """The record without its signature lines."""
    header, body = split_record(data)
    return join_record(header[:1], body)


def object_refs(body: Any) -> list[dict[str, Any]]:
    """Every object reference in a record body (they are edited in place by attacks)."""
    found: list[dict[str, Any]] = []
    if isinstance(body, dict):
        if set(body) == {"sha256", "blake3", "size"}:
            return [body]
        for value in body.values():
            found.extend(object_refs(value))
    elif isinstance(body, list):
        for value in body:
            found.extend(object_refs(value))
    return found
