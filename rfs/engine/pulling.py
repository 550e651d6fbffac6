"""Base images in the adapter: look one up locally, else pull it with a time-out; ask a registry
whether it has one (rfs check)."""

from __future__ import annotations

import json
import logging
from typing import Any

import docker.auth
import docker.errors
import requests
import urllib3

from rfs.engine.apicalls import ApiCaller, _answer_message, _is_timeout, _PullFailed
from rfs.errors import EngineError, EnvironmentProblem

log = logging.getLogger("rfs.engine")


class PullOps(ApiCaller):
    """Resolving and pulling base images (mixed into `rfs.engine.docker_engine.DockerEngine`)."""

    _pull_timeout_s: float

    def image_id(self, ref: str) -> str | None:
        """The local image ID ("sha256:...") of a tag or ID, or None if absent. Never pulls."""
        info = self._inspect_image(ref)
        return None if info is None else str(info["Id"])

    def _inspect_image(self, ref: str) -> dict[str, Any] | None:
        with self._calling(f"inspect image {ref}"):
            try:
                info: dict[str, Any] = self._api.inspect_image(ref)
            except docker.errors.NotFound:
                return None
        return info

    def resolve_base(
        self, name: str, tag: str, *, pull: bool = False, platform: str | None = None
    ) -> str:
        """The image ID of base image `name:tag`: local if present, else pulled (for
        `platform` when given: a multi-platform tag resolves to that platform's image).

        `pull` asks the registry even when the image is local (`rfs build --pull`).
        Fails within `pull_timeout_s` of silence from the engine when no registry answers.
        """
        ref = f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
        if pull:
            try:
                self._pull(name, tag, ref, platform)
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
            self._pull(name, tag, ref, platform)
            found = self.image_id(ref)
            if found is None:
                raise _PullFailed("the engine reported success but does not have the image")
        except EngineError as exc:
            raise EnvironmentProblem(
                f"base image {ref} is not present locally and could not be pulled: {exc.message}",
                hint=f"load it into the engine (docker load / docker pull {ref}) and retry",
            ) from exc
        return found

    def _pull(self, name: str, tag: str, ref: str, platform: str | None = None) -> None:
        # The SDK's pull() sends timeout=None, so a registry that never answers would hang the
        # build; this is the same request with a read timeout between progress messages.
        with self._calling(f"pull {ref}"):
            registry, _ = docker.auth.resolve_repository_name(name)
            header = docker.auth.get_config_header(self._api, registry)
            url = f"{self._api.base_url}/v{self._api.api_version}/images/create"
            params = {"fromImage": name, "tag": tag}
            if platform:  # /images/create takes it since API 1.32, Podman's compat API too
                params["platform"] = platform
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

    def check_base(self, name: str, tag: str, platform: str | None = None) -> None:
        """Raise EnvironmentProblem unless `name:tag` is local or a registry has it (rfs check).

        Docker answers from the registry's manifest without pulling; Podman's compat API has no
        such query (404), so there the image is pulled, as the build would.
        """
        ref = f"{name}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
        if self.image_id(ref) is not None:
            return
        if self.name == "podman":
            self.resolve_base(name, tag, platform=platform)
            return
        try:
            with self._calling(f"ask a registry for {ref}"):
                registry, _ = docker.auth.resolve_repository_name(name)
                header = docker.auth.get_config_header(self._api, registry)
                url = f"{self._api.base_url}/v{self._api.api_version}/distribution/{ref}/json"
                resp = self._api.get(
                    url,
                    headers={"X-Registry-Auth": header} if header else {},
                    timeout=(self._timeout_s, self._pull_timeout_s),
                )
                if resp.status_code >= 400:
                    raise _PullFailed(_answer_message(resp))
        except EngineError as exc:
            raise EnvironmentProblem(
                f"base image {ref} is not in the {self._title} engine and cannot be pulled: "
                f"{exc.message}",
                hint=f"load it into the engine (docker load / docker pull {ref}) and retry",
            ) from exc
