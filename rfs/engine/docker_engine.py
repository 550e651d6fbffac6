"""Docker, and Podman through its Docker-compatible API, via the docker SDK's low-level client.

This module is the boundary: every docker/requests/urllib3/socket exception is translated here
into an `rfs.errors` exception with a sentence a person can act on. Exceptions raised by the
caller's callbacks (`on_output`, `on_progress`, `dest.write`) are not engine failures and pass
through untouched, as do KeyboardInterrupt and SystemExit.

Quirks of the Docker API (20.10, API 1.40/1.41) worked around: `commit` would leak a step's
settings into every later step (`rfs.engine.commitconfig`, also for Podman 4.3, whose commit
ignores the config body); reading a command's output (`rfs.engine.containers`); `pull()` in
the SDK has no timeout (we make the same request with one). Podman answers with bare hex IDs.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import suppress
from typing import Any, BinaryIO

import docker
import docker.auth
import docker.errors
import docker.types
import docker.utils
import requests

from rfs.engine.apicalls import (
    _explanation,
    _full_id,
    _split_tag,
    _start_failure,
)
from rfs.engine.base import EMPTY, MANAGED_LABEL, PROBE_LABEL, BinarySink, RunSpec
from rfs.engine.commitconfig import commit_config, podman_changes
from rfs.engine.containers import ContainerOps
from rfs.engine.diffs import DiffOps
from rfs.engine.lite import platform_of
from rfs.engine.pulling import PullOps
from rfs.errors import EngineError, EnvironmentProblem, StartFailed, StepFailed

log = logging.getLogger("rfs.engine")

#: Pinned rather than negotiated, so `connect` makes no request. 1.40 is Docker 19.03+ and
#: Podman 3+; nothing here needs a newer API.
API_VERSION = "1.40"

_EXPORT_CHUNK = 1 << 20
# How long a probe container's `true` may take to end before it is removed anyway.
_PROBE_WAIT_S = 10
# The export container is never started, so its command only has to be syntactically there.
_EXPORT_ARGV = ["/.rfs-export-container-never-runs"]


class DockerEngine(ContainerOps, PullOps, DiffOps):
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
        self._removal_lock = threading.Lock()
        self._remover = None
        self._removing = []
        try:
            tls = docker.utils.kwargs_from_env().get("tls") if tls_from_env else None
            self._api: Any = docker.APIClient(
                base_url=base_url, version=API_VERSION, timeout=timeout_s, tls=tls
            )
        except docker.errors.DockerException as exc:
            raise EngineError(
                f"cannot use {self._title} engine address {base_url!r}: {_explanation(exc)}"
            ) from exc

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

    def image_size(self, ref: str) -> int | None:
        """The size in bytes of image `ref`'s files (all its layers), or None if unknown."""
        info = self._inspect_image(ref)
        size = None if info is None else info.get("Size")
        return size if isinstance(size, int) and size > 0 else None

    def image_platform(self, ref: str) -> str:
        """ "os/architecture[/variant]" of local image `ref` ("" if the engine does not say)."""
        info = self._inspect_image(ref)
        return platform_of(info) if info is not None else ""

    def has_tag(self, tag: str) -> bool:
        """Whether `tag` names an image in the engine."""
        return self.image_id(tag) is not None

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
                "restart the Podman service, or remove container.oci_runtime",
            )
        if runtime not in names:
            raise EnvironmentProblem(
                f"the {self._title} engine has no OCI runtime {runtime!r} (it has: "
                f"{', '.join(names) or 'none listed'})",
                hint='add it to "runtimes" in /etc/docker/daemon.json, or remove '
                "container.oci_runtime",
            )
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
                raise EngineError(
                    f"the {self._title} engine could not {what}: "
                    f"{message.get('error') or message.get('errorDetail')}"
                )
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
        raise EngineError(
            f"the {self._title} engine did not say which image it made when "
            f"asked to {what}: {messages[-3:]}"
        )

    def build_image(
        self,
        context: BinaryIO,
        *,
        dockerfile: str,
        tag: str,
        step: str,
        build_args: Mapping[str, str] = EMPTY,
        target: str | None = None,
        on_output: Callable[[bytes], None] | None = None,
        no_cache: bool = False,
        platform: str | None = None,
    ) -> str:
        """Build a Dockerfile from a context tar and tag it `tag` (`rfs.engine.imagebuild`)."""
        from rfs.engine.imagebuild import build_image

        build_image(
            self,
            context,
            dockerfile=dockerfile,
            tag=tag,
            step=step,
            build_args=build_args,
            target=target,
            on_output=on_output,
            no_cache=no_cache,
            platform=platform,
        )
        found = self.image_id(tag)
        if found is None:
            raise EngineError(
                f"the {self._title} engine said it built {dockerfile} but has no image {tag}"
            )
        return _full_id(found)

    # -- running steps -------------------------------------------------------------------

    def run_and_commit(
        self,
        spec: RunSpec,
        *,
        step: str,
        tag: str,
        on_output: Callable[[bytes], None],
        keep_failed: bool = False,
        on_exited: Callable[[str], cf.Future[Any] | None] | None = None,
    ) -> str:
        """Run `spec.argv` in a fresh container, stream its output, commit it as `tag`.

        `on_exited` is called with the container's ID once the command has succeeded, before
        the commit: what it starts reading the container (its export, `export_container`)
        runs alongside the commit, and the container stays until the future it returns ends.

        Returns the committed image ID. Raises StepFailed (with the output's last lines) when
        the command cannot start, exits non-zero or outlives `spec.timeout_s`. The container
        is removed in every case, including KeyboardInterrupt and errors from `on_output`
        (once committed, in the background: `settle`), except with `keep_failed` when the
        command ran and failed: then it stays, stopped, and `StepFailed.container` names it.
        """
        parent = self._inspect_image(spec.image)
        if parent is None:
            raise EngineError(f"image {spec.image} is not present in the {self._title} engine")
        if spec.runtime is not None:
            self.check_runtime(spec.runtime)
        cid = self._create(spec, step)
        kept = committed = False
        reading: cf.Future[Any] | None = None
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
            if on_exited is not None:
                reading = on_exited(cid)
            repo, tag_name = _split_tag(tag)
            conf = commit_config(parent.get("Config") or {}, spec)
            # Podman's compat API ignores the config body and takes only `changes`.
            changes = podman_changes(conf) if self.name == "podman" else None
            previous = self.image_id(tag)
            with self._calling(f"commit step {step} as {tag}"):
                result = self._api.commit(
                    cid, repository=repo, tag=tag_name, conf=conf, changes=changes
                )
            committed = True
            image_id = _full_id(str(result["Id"]))
            self._retire(previous, image_id)
            return image_id
        finally:
            if committed:
                self._discard_soon(cid, after=reading)
            elif not kept:
                self._discard(cid)  # what read it (`reading`) fails, and its caller sees that

    def probe_start(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool,
        labels: Mapping[str, str] = EMPTY,
    ) -> str | None:
        """Start a short-lived container of local `image` running `argv` (no network, nothing
        mounted) and remove it: the runtime's start error, or None when it started."""
        spec = RunSpec(
            image=image,
            argv=tuple(argv),
            privileged=privileged,
            network=False,
            labels={**labels, PROBE_LABEL: "privileged" if privileged else "plain"},
        )
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

    # -- export and image housekeeping ---------------------------------------------------

    def export(
        self,
        image: str,
        dest: BinarySink,
        *,
        labels: Mapping[str, str] = EMPTY,
        on_progress: Callable[[int], None] | None = None,
        platform: str | None = None,
    ) -> None:
        """Stream the flattened filesystem of `image` as a tarball into `dest`.

        The tarball comes from a created, never-started container (created for `platform`,
        as the commands' containers are), in 1 MiB chunks; memory use does not grow with the
        image. `on_progress` receives the running byte count.
        """
        with self._calling(f"create a container to export {image}"):
            config = self._api.create_container_config(
                image,
                command=_EXPORT_ARGV,
                entrypoint=[],
                labels={**labels, MANAGED_LABEL: "1"},
                host_config=self._api.create_host_config(network_mode="none"),
            )
            cid = self._post_create(config, platform)
        try:
            self._drain(
                lambda: self._api.export(cid, chunk_size=_EXPORT_CHUNK),
                dest,
                f"export {image}",
                f"the export of {image}",
                on_progress,
            )
        finally:
            self._discard(cid)

    def export_container(
        self, cid: str, dest: BinarySink, *, on_progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream the filesystem of the (stopped) container `cid` as a tarball into `dest`: the
        export of the image it is being committed as (`run_and_commit`'s `on_exited`)."""
        self._drain(
            lambda: self._api.export(cid, chunk_size=_EXPORT_CHUNK),
            dest,
            f"export container {cid[:12]}",
            f"the export of container {cid[:12]}",
            on_progress,
        )

    def save_image(self, ref: str, dest: BinarySink) -> None:
        """Stream `ref` with its parent layers as an image tarball (`docker save`) into `dest`."""
        self._drain(
            lambda: self._api.get_image(ref, chunk_size=_EXPORT_CHUNK),
            dest,
            f"save image {ref}",
            f"the saved image {ref}",
        )

    def _drain(
        self,
        request: Callable[[], Iterable[bytes]],
        dest: BinarySink,
        doing: str,
        written: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
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
                raise EnvironmentProblem(f"cannot write {written}: {exc.strerror or exc}") from exc
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
                    raise EngineError(
                        f"the {self._title} engine could not load an image "
                        f"tarball: {message['error']}"
                    )
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
        self.settle()  # a container of `previous` being removed in the background holds it
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
        self.settle()  # a container being removed in the background still holds its image
        with self._calling(f"remove image {ref}"), suppress(docker.errors.NotFound):
            self._api.remove_image(ref)

    def container_labels(self, label: str) -> dict[str, dict[str, str]]:
        """The labels of every container carrying `label` (a key or "key=value"), by ID."""
        self.settle()  # not those being removed in the background
        with self._calling(f"list containers labelled {label}"):
            found = self._api.containers(all=True, filters={"label": label})
        return {str(c["Id"]): dict(c.get("Labels") or {}) for c in found}

    def remove_containers(self, label: str, *, keep: Collection[str] = ()) -> int:
        """Force-remove every container carrying `label` ("key=value" or "key") except the
        ones whose full ID is in `keep`; return the count. Settles first (`settle`)."""
        self.settle()  # the background removals first: they would answer 409 or 404 here
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
