"""The one engine query a cached build needs, without the docker SDK.

Resolving the base image's tag to its ID is the only engine round trip of a build whose image
is up to date. Importing the docker SDK (and requests, urllib3) costs about 0.1 s, more than
the rest of such a build; this module asks the engine's unix socket directly, over a plain
socket (even http.client's import costs 20 ms).
Anything unusual (not a unix socket, an unexpected answer) raises `Unavailable`, and the caller
goes the full SDK way, which also gives the error messages.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

API_VERSION = "1.40"  # the same API version the SDK client pins
_MAX_ANSWER = 4 << 20  # an image's inspect document is a few KiB


class Unavailable(Exception):
    """This shortcut cannot answer; use the full engine client."""


def _get(path: str, target: str, timeout_s: float) -> tuple[int, bytes]:
    """One HTTP/1.0 GET over a unix socket: (status, body). HTTP/1.0 means the engine
    answers without chunking and closes the connection, so reading to the end is the body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks, size = [], 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER:
                raise Unavailable("answer too large")
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[1].isdigit():
        raise Unavailable("not an HTTP answer")
    return int(status[1]), body


def image_id(base_url: str, ref: str, timeout_s: float = 5.0) -> str | None:
    """The ID of local image `ref` (a tag or an ID), None if the engine has no such image."""
    if not base_url.startswith("unix://"):
        raise Unavailable(base_url)
    target = f"/v{API_VERSION}/images/{quote(ref, safe='/:@')}/json"
    try:
        status, body = _get(base_url[len("unix://"):], target, timeout_s)
    except OSError as exc:
        raise Unavailable(str(exc)) from exc
    if status == 404:
        return None
    if status != 200:
        raise Unavailable(f"HTTP {status}")
    try:
        found = json.loads(body)["Id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Unavailable("unexpected answer") from exc
    if not isinstance(found, str) or not found:
        raise Unavailable("unexpected answer")
    return found if found.startswith("sha256:") else f"sha256:{found}"  # Podman: bare hex
