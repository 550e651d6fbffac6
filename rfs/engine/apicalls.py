"""Calling the Docker API: every docker/requests/urllib3/socket exception becomes an
`rfs.errors` exception with a sentence a person can act on (`ApiCaller._calling`), plus the
small readers of the engine's answers the adapter shares."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docker
import docker.errors
import requests
import urllib3

from rfs.errors import EngineError, RfsError


class _PullFailed(EngineError):
    """The engine answered but could not pull the image."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps: urllib3 tucks the socket error into `args`/`reason`."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _is_timeout(exc: BaseException) -> bool:
    timeouts = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    return any(isinstance(e, timeouts) for e in _causes(exc))


def _reason(exc: BaseException) -> str:
    """The socket-level reason for a failed request, in a few plain words."""
    words = {
        errno.ENOENT: "no such socket",
        errno.ECONNREFUSED: "connection refused",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ECONNRESET: "connection reset",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
    }
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno is not None:
            return words.get(cause.errno) or (cause.strerror or str(cause)).lower()
    for cause in _causes(exc):
        if isinstance(cause, urllib3.exceptions.ProtocolError):
            return "the connection was closed unexpectedly"
    return str(exc) or type(exc).__name__


def _explanation(exc: Any) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text).strip()


def _start_failure(exc: Any) -> str:
    """The useful end of a runtime's start error, e.g. 'exec: "x": executable file not found'."""
    text = _explanation(exc)
    marker = text.find("exec: ")
    if marker >= 0:
        text = text[marker:]
    return text.removesuffix(": unknown")


def _answer_message(resp: Any) -> str:
    """The engine's message in an error answer (JSON `message`, else the body)."""
    try:
        message = resp.json().get("message") or resp.text
    except ValueError:
        message = resp.text
    return str(message).strip()


def _full_id(image_id: str) -> str:
    # Podman's commit answers with the bare hex digest, its inspect with "sha256:<hex>".
    return image_id if ":" in image_id else f"sha256:{image_id}"


def _split_tag(tag: str) -> tuple[str, str]:
    repo, name = docker.utils.parse_repository_tag(tag)
    return str(repo), str(name or "latest")


class ApiCaller:
    """What every part of the adapter needs to call the engine and word its failures."""

    name: str
    base_url: str
    _title: str
    _timeout_s: float
    _api: Any

    def _unreachable(self, exc: BaseException, what: str) -> EngineError:
        if _is_timeout(exc):
            return EngineError(
                f"the {self._title} engine at {self.base_url} did not answer within "
                f"{self._timeout_s:g} s while trying to {what}",
                hint="the engine may be overloaded or hung; check `docker info` / `podman info`",
            )
        reason = _reason(exc)
        if self.name == "podman":
            ask, hint = "is the Podman API service running?", "systemctl start podman.socket"
        else:
            ask, hint = "is dockerd running?", "systemctl start docker"
        if reason == "permission denied":
            ask, hint = "can this user use it?", "run as root or as a member of the engine's group"
        return EngineError(
            f"cannot reach the {self._title} engine at {self.base_url}: {reason} — {ask}", hint
        )

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Translate foreign exceptions raised inside the block into EngineError."""
        try:
            yield
        except RfsError:
            raise
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # incl. requests' errors
            if isinstance(exc, docker.errors.APIError):  # an HTTP error: the engine answered
                raise EngineError(
                    f"the {self._title} engine could not {what}: {_explanation(exc)}"
                ) from exc
            raise self._unreachable(exc, what) from exc
        except docker.errors.DockerException as exc:  # refused by the SDK before any request
            raise EngineError(f"cannot {what}: {_explanation(exc)}") from exc
