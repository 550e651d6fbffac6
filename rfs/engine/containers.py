"""Running one command in a container of the Docker API: create it with the step's settings,
follow its output without a read timeout (and without trusting a stream to end), wait for it
with bounds, stop it on time-out, remove it whatever happens.

- `attach(stream=True)` keeps the client's read timeout on its socket and the SDK turns the
  timeout into a silent end of stream, so a command quiet for longer than the timeout would
  lose output; the SDK's `logs()` drops which stream each frame came from. We read the
  `logs?follow=1` endpoint ourselves without a read timeout: served from the json-file log,
  it never misses lines a fast command printed before we started reading.
- stdout and stderr travel through separate pipes, so their relative order is not kept (see
  `_Tail`); order within each stream is.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import logging
import queue
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import docker
import docker.errors
import docker.types
import requests
import urllib3

from rfs.engine.apicalls import ApiCaller, _answer_message, _is_timeout
from rfs.engine.base import MANAGED_LABEL, CopySource, RunSpec
from rfs.errors import EngineError

log = logging.getLogger("rfs.engine")

_TAIL_LINES = 20
_ERR_LINES = 5
_TAIL_BYTES = 64 * 1024
_HEADERS_S = 30.0  # an engine that has not started answering a request by then never will
_POLL_S = 0.5  # bounded queue waits keep Ctrl-C prompt while a step is silent
_CHECK_S = 3.0  # how often a silent step's container is inspected, and the grace after it ends
_DRAIN_S = 10.0
_COPY_ATTEMPTS = 2
_WAIT_S = 15.0  # longest single wait() before asking inspect whether the container ended
# Go's os.FileMode bits, as the engines' path stat reports them.
_GO_SYMLINK = 1 << 27
_GO_DIR = 1 << 31


class _NotFrames(Exception):
    """The answer to a logs request is not a multiplexed output stream (an engine's error)."""

    def __init__(self, head: bytes) -> None:
        super().__init__(head.decode("utf-8", "replace").strip())


def _frames(raw: Any) -> Iterator[tuple[int, bytes]]:
    """Demultiplex a non-TTY output stream: 8-byte headers (stream id, big-endian size).
    _NotFrames if a header is not one (stream ids 0-2, three zero bytes)."""
    while True:
        header = raw.read(8)
        if len(header) < 8:
            return
        if header[0] > 2 or header[1:4] != b"\0\0\0":
            raise _NotFrames(header + raw.read(1024))
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


class ContainerOps(ApiCaller):
    """The container half of the adapter: create, follow, wait, stop, remove."""

    # Containers being removed in the background (`_discard_soon`); set by the engine's init.
    _removal_lock: threading.Lock
    _remover: cf.ThreadPoolExecutor | None
    _removing: list[cf.Future[None]]

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
            config = self._api.create_container_config(
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
            )
            return self._post_create(config, spec.platform)

    def _post_create(self, config: dict[str, Any], platform: str | None) -> str:
        """Create a container of `config` for `platform` (None: the image's); its ID.

        The SDK's create_container would add proxy variables from ~/.docker/config.json (an
        input no cache key sees) and refuses `platform` below API 1.41, which the client does
        not pin: the create request itself is the 1.41 one when a platform is asked for
        (Docker 20.10 then refuses an image of another platform; Podman 4.3 takes the
        parameter and uses the image's)."""
        version = "1.41" if platform else self._api.api_version
        params = {"platform": platform} if platform else None
        url = f"{self._api.base_url}/v{version}/containers/create"
        created = self._api._result(self._api._post_json(url, data=config, params=params), True)
        return str(created["Id"])

    def _copy_in(self, cid: str, source: CopySource, step: str) -> None:
        """Extract `source`'s archive at `/` in the created container `cid`."""
        with tempfile.TemporaryFile() as archive:
            with self._calling(f"look up paths in the container of step {step}"):
                source.write(archive, lambda path: self._directory_link(cid, path))
            for attempt in range(_COPY_ATTEMPTS):
                archive.seek(0)
                try:
                    with self._calling(f"copy files into the container of step {step}"):
                        self._api.put_archive(cid, "/", archive)
                    return
                except EngineError as exc:
                    # Podman 4.3 copies through a child process that once died under load
                    # ("passing bulk input to subprocess: write |1: broken pipe"); the
                    # container has not started, so the same archive can be put again.
                    if attempt + 1 == _COPY_ATTEMPTS or "broken pipe" not in str(exc):
                        raise
                    log.info("copying into the container of step %s again: %s", step, exc)

    def _path_stat(self, cid: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of `path` in container `cid` (HEAD .../archive), None if absent."""
        url = self._api._url("/containers/{0}/archive", cid)
        resp = self._api.head(url, params={"path": path}, timeout=self._timeout_s)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise EngineError(
                f"the {self._title} engine could not stat {path} in a container: "
                f"{_answer_message(resp)}"
            )
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
                resp = self._api.get(
                    url,
                    params={"follow": 1, "stdout": 1, "stderr": 1},
                    stream=True,
                    timeout=(self._timeout_s, _HEADERS_S),
                )
            except requests.exceptions.RequestException as exc:
                if not _is_timeout(exc):
                    raise
                # Podman 4.3 was seen never to answer a follow request (a build hung for good):
                # wait for the command to end instead, then fetch its output in one go.
                log.warning(
                    "the %s engine did not answer a request to %s; waiting for the "
                    "command to end to read its output",
                    self._title,
                    what,
                )
            if resp is not None:
                if resp.status_code >= 400:
                    raise EngineError(f"the {self._title} engine could not {what}: {resp.text}")
                with suppress(AttributeError, OSError):
                    raw = self._api._get_raw_response_socket(resp)  # SocketIO on unix sockets
                    getattr(raw, "_sock", raw).settimeout(None)
        items: queue.SimpleQueue[tuple[int, bytes] | BaseException | None] = queue.SimpleQueue()

        delivered: list[bool] = []

        def pump() -> None:
            stream = resp
            try:
                if stream is None:
                    while self._exited(cid) is None:
                        time.sleep(_POLL_S)
                    stream = self._api.get(
                        url, params={"stdout": 1, "stderr": 1}, stream=True, timeout=self._timeout_s
                    )
                try:
                    for frame in _frames(stream.raw):
                        delivered.append(True)
                        items.put(frame)
                except _NotFrames as exc:
                    if delivered:
                        raise EngineError(
                            f"the {self._title} engine sent an error in place of output "
                            f"while asked to {what}: {exc}"
                        ) from exc
                    # Podman 4.3 was seen to answer the follow request of a command that had
                    # just ended with an error in place of its output ("failed to obtain logs
                    # ...: no such process"): read the whole output again once it has ended.
                    stream.close()
                    while self._exited(cid) is None:
                        time.sleep(_POLL_S)
                    stream = self._api.get(
                        url, params={"stdout": 1, "stderr": 1}, stream=True, timeout=self._timeout_s
                    )
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
                        log.warning(
                            "the %s engine kept the output of container %s open after "
                            "it ended; stopped reading it",
                            self._title,
                            cid[:12],
                        )
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
                status = self._wait(cid, _WAIT_S if left is None else min(max(left, 0.1), _WAIT_S))
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

    def _discard_soon(self, cid: str, after: cf.Future[Any] | None = None) -> None:
        """Remove, in the background, the container of a step that succeeded: it is committed,
        so the next step need not wait the ~70 ms the engine takes; once `after` (what still
        reads the container: its export) has ended, however it ended. `settle` waits for
        these removals, and so does `remove_containers`, which a build calls at its end:
        nothing is left behind."""

        def remove() -> None:
            if after is not None:
                cf.wait([after])
            self._discard(cid)

        with self._removal_lock:
            if self._remover is None:
                self._remover = cf.ThreadPoolExecutor(1, thread_name_prefix="rfs-remove")
            self._removing.append(self._remover.submit(remove))

    def settle(self) -> None:
        """Wait until the containers handed to the background are removed (or their failure
        logged: `_discard`)."""
        with self._removal_lock:
            pending, self._removing = self._removing, []
        for removal in pending:
            removal.result()

    def _discard(self, cid: str) -> None:
        """Force-remove a container; failure is logged, not raised (its label marks it)."""
        try:
            with self._calling(f"remove container {cid[:12]}"), suppress(docker.errors.NotFound):
                self._api.remove_container(cid, force=True, v=True)
        except EngineError as exc:
            log.warning(
                "container %s was left behind (label %s=1): %s", cid[:12], MANAGED_LABEL, exc
            )
