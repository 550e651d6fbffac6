"""A byte-level proxy in front of the real engine socket that keeps what clients send.

Tests point rfs at the proxy (`connection_uri`, `DOCKER_HOST`) and then read the exact requests
rfs made, e.g. the container config of `POST /containers/create`: what the engine was asked to
do, whether or not this host lets it (privileged containers). The engine answers every request
itself; nothing is faked. Listens on a unix socket or on 127.0.0.1 (TCP).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class EngineProxy:
    """Forward connections to `upstream` (a unix socket path), recording client bytes."""

    def __init__(self, upstream: str, listen: Path | None = None) -> None:
        self.upstream = upstream
        if listen is None:
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._server.bind(("127.0.0.1", 0))
            self.uri = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        else:
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(str(listen))
            self.uri = f"unix://{listen}"
        self._server.listen(64)
        self._sent: list[bytearray] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.upstream)
            record = bytearray()
            with self._lock:
                self._sent.append(record)
            self._start(self._pump, client, upstream, record)
            self._start(self._pump, upstream, client, None)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening (connections still open end with their peers)."""
        self._closed = True
        self._server.close()

    def requests(self) -> list[tuple[str, str, bytes]]:
        """Every complete request clients sent so far: (method, path, body)."""
        with self._lock:
            streams = [bytes(r) for r in self._sent]
        return [req for stream in streams for req in _parse(stream)]

    def created(self) -> list[dict[str, Any]]:
        """The bodies of the container-create requests, in order."""
        return [
            json.loads(body)
            for method, path, body in self.requests()
            if method == "POST" and path.split("?")[0].endswith("/containers/create")
        ]


def _parse(stream: bytes) -> Iterator[tuple[str, str, bytes]]:
    pos = 0
    while True:
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            return
        head = stream[pos:end].decode("latin-1").split("\r\n")
        method, path = head[0].split(" ")[:2]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])
        }
        pos = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                eol = stream.find(b"\r\n", pos)
                if eol < 0:
                    return
                size = int(stream[pos:eol].split(b";")[0], 16)
                body += stream[eol + 2 : eol + 2 + size]
                pos = eol + 2 + size + 2
                if size == 0:
                    break
            yield method, path, bytes(body)
        else:
            length = int(headers.get("content-length", "0"))
            if pos + length > len(stream):
                return
            yield method, path, stream[pos : pos + length]
            pos += length
