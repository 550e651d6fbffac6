"""Docker, and Podman through its Docker-compatible API, via the docker SDK's low-level client.

This module is the boundary: every docker/requests/urllib3/socket exception is translated here
into an `rfs.errors` exception with a sentence a person can act on. Exceptions raised by the
caller's callbacks (`on_output`, `on_progress`, `dest.write`) are not engine failures and pass
through untouched, as do KeyboardInterrupt and SystemExit.

Quirks of the Docker API (20.10, API 1.40/1.41) this code works around:
- `commit` merges the container's config into the image config (User, WorkingDir, Env, Labels,
  Cmd), so a step's settings would leak into every later step. We pass the parent image's
  config and neutralise what would leak; see `_commit_config`.
- `attach(stream=True)` keeps the client's read timeout on its socket and the SDK turns the
  timeout into a silent end of stream, so a command quiet for longer than the timeout would
  lose output; the SDK's `logs()` drops which stream each frame came from. We read the
  `logs?follow=1` endpoint ourselves without a read timeout: served from the json-file log,
  it never misses lines a fast command printed before we started reading.
- stdout and stderr travel through separate pipes, so their relative order is not kept (see
  `_Tail`); order within each stream is.
- `pull()` in the SDK has no timeout; we make the same request with a read timeout.

Podman 4.3's compat API differs: its commit ignores the config body (we also send `changes`,
see `_podman_changes`) and answers with a bare hex image ID.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import queue
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

import docker
import docker.auth
import docker.errors
import docker.types
import docker.utils
import requests
import urllib3

from rfs.engine.base import EMPTY, MANAGED_LABEL, BinarySink, CopySource, RunSpec
from rfs.engine.lite import platform_of
from rfs.errors import EngineError, EnvironmentProblem, RfsError, StartFailed, StepFailed

log = logging.getLogger("rfs.engine")

#: Pinned rather than negotiated, so `connect` makes no request. 1.40 is Docker 19.03+ and
#: Podman 3+; nothing here needs a newer API.
API_VERSION = "1.40"

_EXPORT_CHUNK = 1 << 20
_TAIL_LINES = 20
_ERR_LINES = 5
_TAIL_BYTES = 64 * 1024
_HEADERS_S = 30.0  # an engine that has not started answering a request by then never will
_POLL_S = 0.5  # bounded queue waits keep Ctrl-C prompt while a step is silent
_CHECK_S = 3.0  # how often a silent step's container is inspected, and the grace after it ends
_DRAIN_S = 10.0
_WAIT_S = 15.0  # longest single wait() before asking inspect whether the container ended
# Docker supplies this PATH at run time when the image sets none; see `_commit_config`.
# Go's os.FileMode bits, as the engines' path stat reports them.
_GO_SYMLINK = 1 << 27
_GO_DIR = 1 << 31
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The export container is never started, so its command only has to be syntactically there.
_EXPORT_ARGV = ["/.rfs-export-container-never-runs"]
# Image config fields a committed layer takes over from its parent.
_KEPT_CONFIG = (
    "User", "Env", "Cmd", "Entrypoint", "WorkingDir", "Labels", "ExposedPorts", "Volumes",
    "StopSignal", "Healthcheck", "OnBuild", "Shell",
)


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


# How long a probe container's `true` may take to end before it is removed anyway.
_PROBE_WAIT_S = 10


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


def _frames(raw: Any) -> Iterator[tuple[int, bytes]]:
    """Demultiplex a non-TTY output stream: 8-byte headers (stream id, big-endian size)."""
    while True:
        header = raw.read(8)
        if len(header) < 8:
            return
        stream_id, size = struct.unpack(">BxxxL", header)
        data = raw.read(size)
        if data:
            yield stream_id, data
        if len(data) < size:
            return


def _lines(buf: bytearray) -> list[str]:
    return bytes(buf).decode("utf-8", "replace").rstrip().splitlines()


class _Tail:
    """The last lines of a command's output, for StepFailed.

    stdout and stderr reach the engine through separate pipes, so their relative order is lost:
    an error printed last on stderr is often delivered before the stdout lines printed ahead of
    it, and would fall out of a plain tail. So the last stderr lines are kept apart too and
    appended when the combined tail lacks them.
    """

    def __init__(self) -> None:
        self._all = bytearray()
        self._err = bytearray()

    def add(self, stream_id: int, data: bytes) -> None:
        for buf in (self._all, self._err) if stream_id == 2 else (self._all,):
            buf += data
            if len(buf) > 2 * _TAIL_BYTES:
                del buf[:-_TAIL_BYTES]

    def text(self) -> str:
        lines = _lines(self._all)[-_TAIL_LINES:]
        missing = [line for line in _lines(self._err)[-_ERR_LINES:] if line and line not in lines]
        if missing:
            keep = _TAIL_LINES - len(missing) - 1
            lines = [*lines[-keep:], "[last lines on stderr:]", *missing]
        return "\n".join(lines)


class DockerEngine:
    """An `Engine` speaking the Docker API at `base_url` (Docker or Podman's compat socket)."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str = "docker",
        timeout_s: float = 60,
        pull_timeout_s: float = 20,
        tls_from_env: bool = False,
    ) -> None:
        self.name = name
        self.base_url = base_url
        # Bind mounts name host paths, which only mean the same thing to an engine on this
        # machine: a unix socket, or TCP to this host.
        host = base_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        self.local = base_url.startswith("unix://") or host in {"localhost", "127.0.0.1", "[::1]"}
        self._timeout_s = timeout_s
        self._pull_timeout_s = pull_timeout_s
        self._title = "Podman" if name == "podman" else "Docker"
        self._runtimes_ok: set[str] = set()
        try:
            tls = docker.utils.kwargs_from_env().get("tls") if tls_from_env else None
            self._api: Any = docker.APIClient(
                base_url=base_url, version=API_VERSION, timeout=timeout_s, tls=tls
            )
        except docker.errors.DockerException as exc:
            raise EngineError(
                f"cannot use {self._title} engine address {base_url!r}: {_explanation(exc)}"
            ) from exc

    # -- error translation ---------------------------------------------------------------

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

    # -- queries -------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the engine answers; raise EngineError saying how to fix it if not."""
        try:
            with self._calling("answer a ping"):
                self._api.ping()
        except EngineError as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.APIError) and cause.status_code == 404:
                raise EngineError(
                    f"{self.base_url} answers, but not as a {self._title} engine API "
                    f"(HTTP 404 for /_ping)"
                ) from cause
            raise

    def version(self) -> str:
        """The engine's server version, e.g. "20.10.24+dfsg1"."""
        with self._calling("report its version"):
            info = self._api.version()
        return str(info.get("Version") or "unknown")

    def image_id(self, ref: str) -> str | None:
        """The local image ID ("sha256:...") of a tag or ID, or None if absent. Never pulls."""
        info = self._inspect_image(ref)
        return None if info is None else str(info["Id"])

    def image_size(self, ref: str) -> int | None:
        """The size in bytes of image `ref`'s files (all its layers), or None if unknown."""
        info = self._inspect_image(ref)
        size = None if info is None else info.get("Size")
        return size if isinstance(size, int) and size > 0 else None

    def image_platform(self, ref: str) -> str:
        """"os/architecture[/variant]" of local image `ref` ("" if the engine does not say)."""
        info = self._inspect_image(ref)
        return platform_of(info) if info is not None else ""

    def _inspect_image(self, ref: str) -> dict[str, Any] | None:
        with self._calling(f"inspect image {ref}"):
            try:
                info: dict[str, Any] = self._api.inspect_image(ref)
            except docker.errors.NotFound:
                return None
        return info

    def has_tag(self, tag: str) -> bool:
        """Whether `tag` names an image in the engine."""
        return self.image_id(tag) is not None

    def resolve_base(self, name: str, tag: str, *, pull: bool = False) -> str:
        """The image ID of base image `name:tag`: local if present, else pulled.

        `pull` asks the registry even when the image is local (`rfs build --pull`).
        Fails within `pull_timeout_s` of silence from the engine when no registry answers.
        """
        ref = f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
        if pull:
            try:
                self._pull(name, tag, ref)
            except EngineError as exc:
                raise EnvironmentProblem(
                    f"--pull: cannot look up base image {ref} in its registry: {exc.message}",
                    hint="build without --pull to use the image the engine has",
                ) from exc
        found = self.image_id(ref)
        if found is not None:
            return found
        log.info("base image %s is not present locally; pulling it", ref)
        try:
            self._pull(name, tag, ref)
            found = self.image_id(ref)
            if found is None:
                raise _PullFailed("the engine reported success but does not have the image")
        except EngineError as exc:
            raise EnvironmentProblem(
                f"base image {ref} is not present locally and could not be pulled: {exc.message}",
                hint=f"load it into the engine (docker load / docker pull {ref}) and retry",
            ) from exc
        return found

    def _pull(self, name: str, tag: str, ref: str) -> None:
        # The SDK's pull() sends timeout=None, so a registry that never answers would hang the
        # build; this is the same request with a read timeout between progress messages.
        with self._calling(f"pull {ref}"):
            registry, _ = docker.auth.resolve_repository_name(name)
            header = docker.auth.get_config_header(self._api, registry)
            url = f"{self._api.base_url}/v{self._api.api_version}/images/create"
            params = {"fromImage": name, "tag": tag}
            try:
                resp = self._api.post(
                    url,
                    params=params,
                    headers={"X-Registry-Auth": header} if header else {},
                    stream=True,
                    timeout=(self._timeout_s, self._pull_timeout_s),
                )
                try:
                    if resp.status_code >= 400:
                        raise _PullFailed(_answer_message(resp))
                    for line in resp.iter_lines():
                        event = json.loads(line) if line.strip() else {}
                        if event.get("error"):
                            raise _PullFailed(str(event["error"]).strip())
                finally:
                    resp.close()
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                if not _is_timeout(exc):
                    raise
                raise _PullFailed(
                    f"no progress for {self._pull_timeout_s:g} s (is a registry reachable?)"
                ) from exc

    def check_base(self, name: str, tag: str) -> None:
        """Raise EnvironmentProblem unless `name:tag` is local or a registry has it (rfs check).

        Docker answers from the registry's manifest without pulling; Podman's compat API has no
        such query (404), so there the image is pulled, as the build would.
        """
        ref = f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
        if self.image_id(ref) is not None:
            return
        if self.name == "podman":
            self.resolve_base(name, tag)
            return
        try:
            with self._calling(f"ask a registry for {ref}"):
                registry, _ = docker.auth.resolve_repository_name(name)
                header = docker.auth.get_config_header(self._api, registry)
                url = f"{self._api.base_url}/v{self._api.api_version}/distribution/{ref}/json"
                resp = self._api.get(url, headers={"X-Registry-Auth": header} if header else {},
                                     timeout=(self._timeout_s, self._pull_timeout_s))
                if resp.status_code >= 400:
                    raise _PullFailed(_answer_message(resp))
        except EngineError as exc:
            raise EnvironmentProblem(
                f"base image {ref} is not in the {self._title} engine and cannot be pulled: "
                f"{exc.message}",
                hint=f"load it into the engine (docker load / docker pull {ref}) and retry",
            ) from exc

    def check_runtime(self, runtime: str) -> None:
        """Raise EnvironmentProblem unless commands can run with the OCI runtime `runtime`.

        Docker lists its runtimes in /info and refuses others itself. Podman's compat API
        ignores a container's runtime (4.3 records "oci" and runs its default), so asking for
        another one there would silently build with the wrong runtime: refused instead.
        """
        if runtime in self._runtimes_ok:
            return
        with self._calling("list its OCI runtimes"):
            info = self._api.info()
        default = str(info.get("DefaultRuntime") or "")
        names = sorted(info.get("Runtimes") or {})
        if self.name == "podman" and runtime != default:
            raise EnvironmentProblem(
                f"Podman's API cannot choose an OCI runtime per container (it would run "
                f"{default!r}, not {runtime!r})",
                hint=f'set runtime = "{runtime}" in the [engine] table of containers.conf and '
                     "restart the Podman service, or remove container.oci_runtime")
        if runtime not in names:
            raise EnvironmentProblem(
                f"the {self._title} engine has no OCI runtime {runtime!r} (it has: "
                f"{', '.join(names) or 'none listed'})",
                hint='add it to "runtimes" in /etc/docker/daemon.json, or remove '
                     "container.oci_runtime")
        self._runtimes_ok.add(runtime)

    def import_archive(self, path: str, *, image: bool) -> str:
        """Bring a base image tarball into the engine and return its image ID.

        `image`: a `docker save`/OCI archive, loaded as it is (with the tags it carries);
        otherwise a root filesystem tarball, imported as a one-layer image without config.
        Both engines answer an import with the new ID as a "status" message; Podman ignores
        the repository and tag parameters, so none are sent and the caller tags the ID.
        """
        what = f"{'load' if image else 'import'} the base image archive {path}"
        messages: list[dict[str, Any]] = []
        with self._calling(what):
            if image:
                with open(path, "rb") as f:
                    messages = [m for m in self._api.load_image(f) if isinstance(m, dict)]
            else:
                text = str(self._api.import_image_from_file(path))
                messages = [json.loads(line) for line in text.splitlines() if line.strip()]
        for message in messages:
            if message.get("error") or message.get("errorDetail"):
                raise EngineError(f"the {self._title} engine could not {what}: "
                                  f"{message.get('error') or message.get('errorDetail')}")
        for message in reversed(messages):
            if image:  # "Loaded image: name:tag" or "Loaded image ID: sha256:..."
                for line in str(message.get("stream", "")).splitlines():
                    if line.startswith("Loaded image"):
                        found = self.image_id(line.split(": ", 1)[-1].strip())
                        if found is not None:
                            return found
            else:
                status = str(message.get("status") or message.get("id") or "")
                if status.startswith("sha256:"):
                    return status
        raise EngineError(f"the {self._title} engine did not say which image it made when "
                          f"asked to {what}: {messages[-3:]}")

    # -- running steps -------------------------------------------------------------------

    def run_and_commit(
        self, spec: RunSpec, *, step: str, tag: str, on_output: Callable[[bytes], None],
        keep_failed: bool = False,
    ) -> str:
        """Run `spec.argv` in a fresh container, stream its output, commit it as `tag`.

        Returns the committed image ID. Raises StepFailed (with the output's last lines) when
        the command cannot start, exits non-zero or outlives `spec.timeout_s`. The container
        is removed in every case, including KeyboardInterrupt and errors from `on_output`,
        except with `keep_failed` when the command ran and failed: then it stays, stopped,
        and `StepFailed.container` names it.
        """
        parent = self._inspect_image(spec.image)
        if parent is None:
            raise EngineError(f"image {spec.image} is not present in the {self._title} engine")
        if spec.runtime is not None:
            self.check_runtime(spec.runtime)
        cid = self._create(spec, step)
        kept = False
        try:
            if spec.copy_in is not None:
                self._copy_in(cid, spec.copy_in, step)
            with self._calling(f"start the container of step {step}"):
                try:
                    self._api.start(cid)
                except docker.errors.APIError as exc:
                    # A start failure is the step's fault (missing executable, bad user…),
                    # or a privilege the host refuses (the executor tells them apart).
                    raise StartFailed(step, _start_failure(exc)) from exc
            status, timed_out, tail = self._follow(cid, spec, on_output)
            kept = keep_failed and (timed_out or status != 0)
            container = cid if kept else None
            if timed_out:
                raise StepFailed(step, f"timed out after {spec.timeout_s:g} s", tail, container)
            if status != 0:
                raise StepFailed(step, self._exit_message(cid, status), tail, container)
            repo, tag_name = _split_tag(tag)
            conf = _commit_config(parent.get("Config") or {}, spec)
            # Podman's compat API ignores the config body and takes only `changes`.
            changes = _podman_changes(conf) if self.name == "podman" else None
            previous = self.image_id(tag)
            with self._calling(f"commit step {step} as {tag}"):
                result = self._api.commit(
                    cid, repository=repo, tag=tag_name, conf=conf, changes=changes
                )
            committed = _full_id(str(result["Id"]))
            self._retire(previous, committed)
            return committed
        finally:
            if not kept:
                self._discard(cid)

    def _copy_in(self, cid: str, source: CopySource, step: str) -> None:
        """Extract `source`'s archive at `/` in the created container `cid`."""
        with tempfile.TemporaryFile() as archive:
            with self._calling(f"look up paths in the container of step {step}"):
                source.write(archive, lambda path: self._directory_link(cid, path))
            archive.seek(0)
            with self._calling(f"copy files into the container of step {step}"):
                self._api.put_archive(cid, "/", archive)

    def _path_stat(self, cid: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of `path` in container `cid` (HEAD .../archive), None if absent."""
        url = self._api._url("/containers/{0}/archive", cid)
        resp = self._api.head(url, params={"path": path}, timeout=self._timeout_s)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise EngineError(f"the {self._title} engine could not stat {path} in a container: "
                              f"{_answer_message(resp)}")
        header = resp.headers.get("X-Docker-Container-Path-Stat", "")
        found: dict[str, Any] = json.loads(base64.b64decode(header)) if header else {}
        return found

    def _directory_link(self, cid: str, path: str) -> str | None:
        """Where a symlink at `path` leads when it leads to a directory, else None.

        Go's FileMode: bit 27 marks a symlink, bit 31 a directory. Both engines answer with the
        link's target resolved inside the container (Podman gives every path a linkTarget,
        itself for a non-link, so the symlink bit decides)."""
        found = self._path_stat(cid, path)
        if found is None or not int(found.get("mode", 0)) & _GO_SYMLINK:
            return None
        target = str(found.get("linkTarget") or "")
        if not target.startswith("/"):
            return None
        resolved = self._path_stat(cid, target)
        if resolved is None or not int(resolved.get("mode", 0)) & _GO_DIR:
            return None
        return target

    def probe_start(self, image: str, argv: Sequence[str], *, privileged: bool,
                    labels: Mapping[str, str] = EMPTY) -> str | None:
        """Start a short-lived container of local `image` running `argv` (no network, nothing
        mounted) and remove it: the runtime's start error, or None when it started."""
        spec = RunSpec(image=image, argv=tuple(argv), privileged=privileged, network=False,
                       labels=labels)
        what = "privileged probe" if privileged else "probe"
        cid = self._create(spec, what)
        try:
            with self._calling(f"start a {what} container"):
                try:
                    self._api.start(cid)
                except docker.errors.APIError as exc:
                    return _start_failure(exc)
            # Removing it while it exits can fail in Podman 4.3 ("container state improper"):
            # let `argv` (`true`) end first.
            with suppress(docker.errors.APIError, requests.RequestException):
                self._api.wait(cid, timeout=_PROBE_WAIT_S)
            return None
        finally:
            self._discard(cid)

    def _create(self, spec: RunSpec, step: str) -> str:
        mounts = [
            docker.types.Mount(
                target=m.container_path, source=m.host_path, type="bind", read_only=m.read_only
            )
            for m in spec.mounts
        ]
        with self._calling(f"create a container for step {step}"):
            host_config = self._api.create_host_config(
                network_mode=None if spec.network else "none",
                privileged=spec.privileged,
                cap_add=list(spec.cap_add) or None,
                cap_drop=list(spec.cap_drop) or None,
                runtime=spec.runtime,
                mounts=mounts or None,
                # Explicit, because `logs()` is how we read output and a daemon configured for
                # e.g. syslog could not give it back.
                log_config=docker.types.LogConfig(type="json-file"),
            )
            created = self._api.create_container(
                spec.image,
                command=list(spec.argv),
                entrypoint=[],
                user=spec.user or "",
                working_dir=spec.working_dir,
                environment=[f"{k}={v}" for k, v in spec.env.items()],
                hostname=spec.hostname,
                labels={**spec.labels, MANAGED_LABEL: "1"},
                host_config=host_config,
                stop_timeout=spec.stop_timeout_s,
                # The SDK would otherwise add proxy variables from ~/.docker/config.json: an
                # input no cache key sees.
                use_config_proxy=False,
            )
        return str(created["Id"])

    def _follow(
        self, cid: str, spec: RunSpec, on_output: Callable[[bytes], None]
    ) -> tuple[int, bool, str]:
        """Pass output to `on_output` until the command ends; return (exit code, timed out, tail).

        A reader thread blocks on the stream while this thread keeps the deadline, calls
        `on_output` (so its exceptions reach our caller) and stops the container on timeout.
        The stream ends when the container stops or is removed, which ends the thread.
        """
        what = f"read the output of container {cid[:12]}"
        # Our own request, not the SDK's logs(): that drops each frame's stream id, which the
        # tail needs, and a read timeout would cut off a step that is silent for a while.
        url = f"{self._api.base_url}/v{self._api.api_version}/containers/{cid}/logs"
        resp: Any = None
        with self._calling(what):
            try:
                # The answer's headers come at once; only the body may then be silent for long.
                resp = self._api.get(url, params={"follow": 1, "stdout": 1, "stderr": 1},
                                     stream=True, timeout=(self._timeout_s, _HEADERS_S))
            except requests.exceptions.RequestException as exc:
                if not _is_timeout(exc):
                    raise
                # Podman 4.3 was seen never to answer a follow request (a build hung for good):
                # wait for the command to end instead, then fetch its output in one go.
                log.warning("the %s engine did not answer a request to %s; waiting for the "
                            "command to end to read its output", self._title, what)
            if resp is not None:
                if resp.status_code >= 400:
                    raise EngineError(f"the {self._title} engine could not {what}: {resp.text}")
                with suppress(AttributeError, OSError):
                    raw = self._api._get_raw_response_socket(resp)  # SocketIO on unix sockets
                    getattr(raw, "_sock", raw).settimeout(None)
        items: queue.SimpleQueue[tuple[int, bytes] | BaseException | None] = queue.SimpleQueue()

        def pump() -> None:
            stream = resp
            try:
                if stream is None:
                    while self._exited(cid) is None:
                        time.sleep(_POLL_S)
                    stream = self._api.get(url, params={"stdout": 1, "stderr": 1},
                                           stream=True, timeout=self._timeout_s)
                for frame in _frames(stream.raw):
                    items.put(frame)
                items.put(None)
            except BaseException as exc:  # handed to the main thread, translated there
                items.put(exc)
            finally:
                if stream is not None:
                    stream.close()

        threading.Thread(target=pump, name=f"rfs-output-{cid[:12]}", daemon=True).start()
        tail = _Tail()
        deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
        stopped = False
        next_check = time.monotonic() + _CHECK_S
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if stopped:  # the stream outlived the stop by _DRAIN_S: give up on it
                    break
                self._stop(cid, spec.stop_timeout_s)
                # Keep reading: what it printed while being stopped belongs to its output.
                stopped, deadline, now = True, time.monotonic() + _DRAIN_S, time.monotonic()
            try:
                item = items.get(timeout=_POLL_S if deadline is None else deadline - now)
            except queue.Empty:
                # Podman 4.3 was seen to keep a follow stream open after the container had
                # exited (the build hung for good): while the stream is silent, look at the
                # container now and then, and stop reading a stream that outlives it.
                if now >= next_check:
                    next_check = now + _CHECK_S
                    if exited_at is None and self._exited(cid) is not None:
                        exited_at = now
                    if exited_at is not None and now - exited_at >= _CHECK_S:
                        log.warning("the %s engine kept the output of container %s open after "
                                    "it ended; stopped reading it", self._title, cid[:12])
                        break
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                with self._calling(what):
                    raise item
            tail.add(*item)
            on_output(item[1])
        if not stopped:
            # The stream ends when the command does, so wait() returns at once; should the
            # stream have broken early, wait() still honours the deadline. Each wait is bounded
            # and backed by inspect: Podman 4.3's wait was seen never to answer for a container
            # that had exited minutes before (the build hung for good).
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                status = self._wait(cid, _WAIT_S if left is None else min(max(left, 0.1),
                                                                           _WAIT_S))
                if status is None:
                    status = self._exited(cid)
                if status is not None:
                    return status, False, tail.text()
            self._stop(cid, spec.stop_timeout_s)
        return -1, True, tail.text()

    def _exited(self, cid: str) -> int | None:
        """The exit code of a container that is no longer running, else None."""
        with self._calling(f"inspect container {cid[:12]}"):
            state = self._api.inspect_container(cid).get("State") or {}
        if state.get("Running", True):
            return None
        return int(state.get("ExitCode", -1))

    def _wait(self, cid: str, timeout_s: float | None) -> int | None:
        """The container's exit code, or None if it is still running after `timeout_s`."""
        with self._calling(f"wait for container {cid[:12]}"):
            try:
                result = self._api.wait(cid, timeout=timeout_s)
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                # Depending on the transport the SDK raises ReadTimeout or a ConnectionError
                # wrapping urllib3's ReadTimeoutError.
                if timeout_s is not None and _is_timeout(exc):
                    return None
                raise
        return int(result.get("StatusCode", -1))

    def _stop(self, cid: str, stop_timeout_s: int) -> None:
        with self._calling(f"stop container {cid[:12]}"), suppress(docker.errors.NotFound):
            self._api.stop(cid, timeout=stop_timeout_s)

    def _exit_message(self, cid: str, status: int) -> str:
        message = f"exited with code {status}"
        if status == 137:
            try:
                with self._calling(f"inspect container {cid[:12]}"):
                    oom = self._api.inspect_container(cid)["State"].get("OOMKilled")
            except EngineError:
                oom = False
            message += " (killed by the kernel's OOM killer)" if oom else " (killed by SIGKILL)"
        return message

    def _discard(self, cid: str) -> None:
        """Force-remove a container; failure is logged, not raised (its label marks it)."""
        try:
            with self._calling(f"remove container {cid[:12]}"), suppress(docker.errors.NotFound):
                self._api.remove_container(cid, force=True, v=True)
        except EngineError as exc:
            log.warning("container %s was left behind (label %s=1): %s", cid[:12], MANAGED_LABEL,
                        exc)

    # -- export and image housekeeping ---------------------------------------------------

    def export(
        self,
        image: str,
        dest: BinarySink,
        *,
        labels: Mapping[str, str] = EMPTY,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream the flattened filesystem of `image` as a tarball into `dest`.

        The tarball comes from a created, never-started container, in 1 MiB chunks; memory
        use does not grow with the image. `on_progress` receives the running byte count.
        """
        with self._calling(f"create a container to export {image}"):
            created = self._api.create_container(
                image,
                command=_EXPORT_ARGV,
                entrypoint=[],
                labels={**labels, MANAGED_LABEL: "1"},
                host_config=self._api.create_host_config(network_mode="none"),
                use_config_proxy=False,
            )
        cid = str(created["Id"])
        try:
            self._drain(lambda: self._api.export(cid, chunk_size=_EXPORT_CHUNK), dest,
                        f"export {image}", f"the export of {image}", on_progress)
        finally:
            self._discard(cid)

    def save_image(self, ref: str, dest: BinarySink) -> None:
        """Stream `ref` with its parent layers as an image tarball (`docker save`) into `dest`."""
        self._drain(lambda: self._api.get_image(ref, chunk_size=_EXPORT_CHUNK), dest,
                    f"save image {ref}", f"the saved image {ref}")

    def _drain(self, request: Callable[[], Iterable[bytes]], dest: BinarySink, doing: str,
               written: str, on_progress: Callable[[int], None] | None = None) -> None:
        """Copy a streamed response into `dest`: engine errors name `doing`, a failed write
        (a full disk) names `written`."""
        with self._calling(doing):
            chunks = iter(request())
        total = 0
        while True:
            with self._calling(doing):
                chunk = next(chunks, None)
            if chunk is None:
                return
            try:
                dest.write(chunk)
            except OSError as exc:
                raise EnvironmentProblem(
                    f"cannot write {written}: {exc.strerror or exc}") from exc
            total += len(chunk)
            if on_progress is not None:
                on_progress(total)

    def load_image(self, source: BinaryIO) -> list[str]:
        """Load an image tarball (`docker load`) read from `source`; return what was loaded.

        The result holds the tags and IDs from the engine's "Loaded image" messages.
        """
        loaded: list[str] = []
        with self._calling("load an image tarball"):
            for message in self._api.load_image(source):
                if message.get("error"):
                    raise EngineError(f"the {self._title} engine could not load an image "
                                      f"tarball: {message['error']}")
                text = str(message.get("stream", ""))
                for line in text.splitlines():
                    if line.startswith("Loaded image"):
                        loaded.append(line.split(": ", 1)[-1].strip())
        return loaded

    def tag(self, image_id: str, tag: str) -> None:
        """Point `tag` at `image_id` (moving it if it exists)."""
        repo, tag_name = _split_tag(tag)
        previous = self.image_id(tag)
        with self._calling(f"tag {image_id} as {tag}"):
            self._api.tag(image_id, repo, tag_name)
        self._retire(previous, _full_id(image_id))

    def _retire(self, previous: str | None, current: str) -> None:
        """Remove the image a tag pointed at before it moved to `current`, so no untagged
        image is left behind (a build from an empty cache makes every layer again under the
        same key). Kept when something still needs it: another tag, a child image, a
        container (the engine refuses, and that is fine)."""
        if previous is None or previous == current:
            return
        with suppress(docker.errors.APIError, OSError, EngineError):
            info = self._inspect_image(previous)
            # Still named by another tag: keep it (Podman would delete an image by ID with
            # all its tags, where Docker refuses).
            if info is None or info.get("RepoTags"):
                return
            with self._calling(f"remove the replaced image {previous[:19]}"):
                self._api.remove_image(previous)

    def remove_image(self, ref: str) -> None:
        """Remove an image, or just the tag `ref` if the image has others; absent is fine."""
        with self._calling(f"remove image {ref}"), suppress(docker.errors.NotFound):
            self._api.remove_image(ref)

    def container_labels(self, label: str) -> dict[str, dict[str, str]]:
        """The labels of every container carrying `label` (a key or "key=value"), by ID."""
        with self._calling(f"list containers labelled {label}"):
            found = self._api.containers(all=True, filters={"label": label})
        return {str(c["Id"]): dict(c.get("Labels") or {}) for c in found}

    def remove_containers(self, label: str, *, keep: Collection[str] = ()) -> int:
        """Force-remove every container carrying `label` ("key=value" or "key") except the
        ones whose full ID is in `keep`; return the count."""
        with self._calling(f"list containers labelled {label}"):
            found = self._api.containers(all=True, filters={"label": label})
        removed = 0
        for container in found:
            if container["Id"] in keep:
                continue
            with self._calling(f"remove container {container['Id'][:12]}"):
                try:
                    self._api.remove_container(container["Id"], force=True, v=True)
                except docker.errors.NotFound:
                    continue
                except docker.errors.APIError as exc:
                    if exc.status_code == 409:  # someone else is already removing it
                        continue
                    raise
            removed += 1
        return removed


def _commit_config(parent: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The image config for a committed step: the parent's, with the step's settings undone.

    Docker's commit fills every field we leave empty from the container's config, and merges in
    container env vars and labels whose keys we do not mention. So the step's user, working
    directory, env and labels would become defaults for every later step (and our run labels
    would mark containers others create from the layer). We therefore restate the parent's
    values and, where the parent had none, give the neutral equivalent:
    - User "" → "0" and WorkingDir "" → "/" (what Docker uses for empty);
    - an env key the parent lacked → "KEY" without "=", which Docker treats as unset when it
      runs a container; PATH → Docker's default PATH, which is what an unset PATH yields;
    - a label key the parent lacked → "" (labels cannot be deleted; an empty value matches no
      "key=value" filter).
    Only an empty parent Cmd cannot be restored: the step's argv stays as the layer's Cmd,
    which is harmless since rfs always passes a command.
    """
    conf: dict[str, Any] = {k: parent[k] for k in _KEPT_CONFIG if parent.get(k) is not None}
    if spec.user and not conf.get("User"):
        conf["User"] = "0"
    if spec.working_dir and not conf.get("WorkingDir"):
        conf["WorkingDir"] = "/"
    env = list(conf.get("Env") or [])
    parent_keys = {entry.split("=", 1)[0] for entry in env}
    for key in spec.env:
        if key not in parent_keys:
            env.append(f"PATH={_DEFAULT_PATH}" if key == "PATH" else key)
    if env:
        conf["Env"] = env
    labels = dict(conf.get("Labels") or {})
    for key in (*spec.labels, MANAGED_LABEL):
        labels.setdefault(key, "")
    conf["Labels"] = labels
    return conf


def _podman_changes(conf: Mapping[str, Any]) -> list[str]:
    """`conf` as Dockerfile instructions, as far as Podman's commit can take them.

    Podman 4.3 builds the image config from the container and then applies these. Its parser
    takes one plain `LABEL key=value` per instruction, and ENV can set but not unset, so the
    step's env vars stay in the layer's config on Podman.
    """
    changes = [
        f"CMD {json.dumps(conf.get('Cmd') or [])}",
        f"ENTRYPOINT {json.dumps(conf.get('Entrypoint') or [])}",
    ]
    if conf.get("User"):
        changes.append(f"USER {conf['User']}")
    if conf.get("WorkingDir"):
        changes.append(f"WORKDIR {conf['WorkingDir']}")
    for key, value in (conf.get("Labels") or {}).items():
        if value == "" and key and not any(c.isspace() or c in "=\"'" for c in key):
            changes.append(f"LABEL {key}=")
    return changes
