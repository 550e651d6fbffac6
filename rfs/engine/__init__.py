"""The container engine adapter: the only code in rfs that talks to Docker or Podman.

`connect` picks the socket and returns an `Engine`; the SDK is imported only there, so importing
this package (for the types) stays cheap and works without the docker SDK installed. The
types come from `rfs.engine.base` on first use: an up-to-date build imports this package for
`default_uri` and `lite` only.

May import `rfs.host` and `rfs.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rfs.errors import UsageError

if TYPE_CHECKING:
    from rfs.engine.base import EMPTY, MANAGED_LABEL, BinarySink, Engine, Mount, RunSpec

__all__ = [
    "EMPTY",
    "MANAGED_LABEL",
    "BinarySink",
    "Engine",
    "Mount",
    "RunSpec",
    "connect",
    "default_uri",
]

_FROM_BASE = frozenset(__all__) - {"connect", "default_uri"}


def __getattr__(name: str) -> object:
    if name in _FROM_BASE:
        from rfs.engine import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENGINES = ("docker", "podman")
DOCKER_DEFAULT_URI = "unix:///var/run/docker.sock"
PODMAN_ROOT_URI = "unix:///run/podman/podman.sock"


def default_uri(engine: str, environ: Mapping[str, str] | None = None) -> str:
    """The socket URI `connect` uses for `engine` when none is given."""
    env = os.environ if environ is None else environ
    if engine == "docker":
        return env.get("DOCKER_HOST") or DOCKER_DEFAULT_URI
    if engine == "podman":
        if os.geteuid() == 0:
            return PODMAN_ROOT_URI
        runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        return f"unix://{runtime_dir}/podman/podman.sock"
    raise _unknown(engine)


def _unknown(engine: str) -> UsageError:
    return UsageError(f"unknown container engine {engine!r}: choose 'docker' or 'podman'")


def connect(engine: str = "docker", uri: str | None = None, timeout_s: float = 60) -> Engine:
    """Return an `Engine` for `engine` ("docker" or "podman") at `uri`.

    Without `uri`: Docker uses $DOCKER_HOST (with $DOCKER_TLS_VERIFY/$DOCKER_CERT_PATH) or the
    default socket; Podman uses its rootful socket as root, else the user's socket under
    $XDG_RUNTIME_DIR. No request is made here: call `ping()` to check the engine answers.
    `timeout_s` bounds each ordinary API request (not the streams of a running step).
    """
    if engine not in ENGINES:
        raise _unknown(engine)
    base_url = uri or default_uri(engine)
    # Imported here so `import rfs.engine` does not pay for docker/requests/urllib3.
    from rfs.engine.docker_engine import DockerEngine

    use_env_tls = engine == "docker" and uri is None
    return DockerEngine(base_url, name=engine, timeout_s=timeout_s, tls_from_env=use_env_tls)
