"""HTTP plumbing shared by the backends: bounded time-outs, bounded retries, plain-word errors.

Retries come from urllib3's `Retry` (already installed with requests and the docker SDK):
connection failures are retried for every method (nothing was sent), 5xx/429 answers and read
failures only for GET and HEAD. A PUT is not repeated after its body started: a file body
cannot be rewound by urllib3, and an upload that fails is only a warning.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import requests.adapters
import urllib3.util.retry

from rfs.errors import RemoteCacheError
from rfs.remote.codec import CHUNK
from rfs.remote.config import RemoteSettings


def make_session(settings: RemoteSettings) -> requests.Session:
    """A session with rfs's retry policy mounted for http and https."""
    retry = urllib3.util.retry.Retry(
        total=settings.retries,
        connect=settings.retries,
        read=settings.retries,
        status=settings.retries,
        other=0,
        backoff_factor=0.2,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=False,  # a server asking for minutes would stall the build
    )
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "rfs-remote-cache"
    return session


def _reason(exc: BaseException) -> str:
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen or not isinstance(cur, BaseException):
            continue
        seen.add(id(cur))
        if isinstance(cur, requests.exceptions.Timeout | TimeoutError):
            return "timed out"
        if isinstance(cur, http.client.IncompleteRead):
            return "the answer ended early (the server closed the connection)"
        if isinstance(cur, ConnectionRefusedError) or (
            isinstance(cur, OSError) and cur.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror.lower()
        todo.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args])
    text = str(exc)
    if "Max retries exceeded" in text or "NewConnectionError" in text:
        return "cannot connect"
    return text[:200] or type(exc).__name__


@contextlib.contextmanager
def translating(base_url: str, what: str) -> Iterator[None]:
    """Turn requests/urllib3/socket failures inside the block into RemoteCacheError."""
    try:
        yield
    except RemoteCacheError:
        raise
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise RemoteCacheError(f"remote cache {base_url}: cannot {what}: {_reason(exc)}") from exc


def status_error(base_url: str, what: str, resp: requests.Response) -> RemoteCacheError:
    """A RemoteCacheError for an unexpected HTTP status."""
    # At most 1 KiB of the body: an error answer can be as long as a server likes.
    try:
        head = next(resp.iter_content(1024), b"")
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError):
        head = b""
    body = head.decode("utf-8", "replace")[:200].strip()
    detail = f": {body}" if body and "<html" not in body.lower() else ""
    return RemoteCacheError(
        f"remote cache {base_url}: cannot {what}: HTTP {resp.status_code} {resp.reason}{detail}"
    )


# The slowest an object may arrive on average once its grace period is over: 1 MiB/s. An
# object's deadline is the record deadline plus its size at this rate (2 GiB: about 35 min),
# so a big image is never cut short on a slow link, yet a server trickling bytes each inside
# the read time-out cannot hold a build for hours.
MIN_OBJECT_RATE = 1 << 20


def object_deadline_s(grace_s: float, size: int) -> float:
    """How long downloading an object of `size` bytes may take in all."""
    return grace_s + size / MIN_OBJECT_RATE


def download(
    resp: requests.Response, dest: Path, limit: int, base_url: str, deadline_s: float
) -> int:
    """Stream a response body into `dest` within `deadline_s` seconds in all; return the byte
    count. More than `limit` bytes is BadObject: a server cannot make rfs write more than the
    record promised; too slow is RemoteCacheError (the read time-out bounds only the wait
    between bytes)."""
    from rfs.remote.codec import BadObject

    total = 0
    end = time.monotonic() + deadline_s
    with dest.open("wb") as f:
        for chunk in _arrivals(resp, CHUNK):
            total += len(chunk)
            if total > limit:
                raise BadObject(
                    f"remote cache {base_url}: an object is larger than its "
                    f"record says ({limit} bytes)"
                )
            f.write(chunk)
            if time.monotonic() > end:
                raise RemoteCacheError(
                    f"remote cache {base_url}: an object of {limit} bytes took more than "
                    f"{deadline_s:.0f} s ({total} bytes had come)"
                )
    return total


def read_bounded(
    resp: requests.Response, limit: int, deadline_s: float, base_url: str, what: str
) -> bytes:
    """The body of a streamed response, at most `limit` bytes and within `deadline_s` seconds
    in all (the read time-out bounds only the wait between bytes: a server trickling one byte
    at a time must not hold a build). BadObject if larger; RemoteCacheError if too slow."""
    from rfs.remote.codec import BadObject

    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadObject(
            f"remote cache {base_url}: {what} is too large ({declared} bytes; at most {limit})"
        )
    buf = bytearray()
    end = time.monotonic() + deadline_s
    for chunk in _arrivals(resp):
        buf += chunk
        if len(buf) > limit:
            raise BadObject(
                f"remote cache {base_url}: {what} is too large (more than {limit} bytes)"
            )
        if time.monotonic() > end:
            raise RemoteCacheError(
                f"remote cache {base_url}: {what} took more than {deadline_s:.0f} s"
            )
    return bytes(buf)


def _arrivals(resp: requests.Response, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body's bytes as they arrive: each piece is what one read of the socket gave.

    Not `iter_content(size)`: its reads wait until `size` bytes (or the end) have come, so a
    server sending one byte at a time, each inside the read time-out, would hold a reader for
    the whole body before any deadline is looked at. `read1` returns after one socket read.
    """
    raw = resp.raw
    while True:
        piece = raw.read1(size, decode_content=True)
        if not piece:
            return
        yield piece
