"""The engine queries a cached build needs, without the docker SDK.

Resolving the base image's tag to its ID and platform, and asking the engine's version, are the
only engine round trips of a build whose image is up to date. Importing the docker SDK (and
requests, urllib3) costs about 0.1 s, more than the rest of such a build; this module asks the
engine's unix socket directly, over a plain socket (even http.client's import costs 20 ms).
Anything unusual (not a unix socket, an unexpected answer) raises `Unavailable`, and the caller
goes the full SDK way, which also gives the error messages.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any
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


def _get_json(base_url: str, target: str, timeout_s: float) -> dict[str, Any] | None:
    """GET `target` and parse the JSON object it answers; None for HTTP 404."""
    if not base_url.startswith("unix://"):
        raise Unavailable(base_url)
    try:
        status, body = _get(base_url[len("unix://") :], target, timeout_s)
    except OSError as exc:
        raise Unavailable(str(exc)) from exc
    if status == 404:
        return None
    if status != 200:
        raise Unavailable(f"HTTP {status}")
    try:
        found = json.loads(body)
    except ValueError as exc:
        raise Unavailable("unexpected answer") from exc
    if not isinstance(found, dict):
        raise Unavailable("unexpected answer")
    return found


def platform_of(inspect: Mapping[str, Any]) -> str:
    """ "os/architecture[/variant]" from an image's inspect document ("" if it says nothing)."""
    parts = [inspect.get("Os"), inspect.get("Architecture"), inspect.get("Variant")]
    if not all(isinstance(p, str) for p in parts[:2]) or not parts[0] or not parts[1]:
        return ""
    variant = parts[2] if isinstance(parts[2], str) and parts[2] else None
    return "/".join(str(p) for p in parts[:2]) + (f"/{variant}" if variant else "")


def image_facts(base_url: str, ref: str, timeout_s: float = 5.0) -> tuple[str, str] | None:
    """(ID, platform) of local image `ref` (a tag or an ID), None if the engine has none."""
    found = _get_json(base_url, f"/v{API_VERSION}/images/{quote(ref, safe='/:@')}/json", timeout_s)
    if found is None:
        return None
    ident = found.get("Id")
    if not isinstance(ident, str) or not ident:
        raise Unavailable("unexpected answer")
    ident = ident if ident.startswith("sha256:") else f"sha256:{ident}"  # Podman: bare hex
    return ident, platform_of(found)


def image_id(base_url: str, ref: str, timeout_s: float = 5.0) -> str | None:
    """The ID of local image `ref` (a tag or an ID), None if the engine has no such image."""
    facts = image_facts(base_url, ref, timeout_s)
    return None if facts is None else facts[0]


def engine_version(base_url: str, timeout_s: float = 5.0) -> str:
    """The engine's server version ("20.10.24+dfsg1", "4.3.1")."""
    found = _get_json(base_url, f"/v{API_VERSION}/version", timeout_s)
    version = None if found is None else found.get("Version")
    if not isinstance(version, str) or not version:
        raise Unavailable("unexpected answer")
    return version
