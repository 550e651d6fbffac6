"""`http(s)://` remote caches speaking the HTTP protocol of Bazel's remote cache.

    GET/PUT/HEAD  <base>/ac/<name>      records (64 hex digits: a step key or a scoped name)
    GET/PUT/HEAD  <base>/cas/<sha256>   objects, by the sha256 of their bytes

Served by nginx with WebDAV PUT (`cache/nginx/`), bazel-remote (start it with
`--disable_http_ac_validation`: rfs's records are JSON, not Bazel ActionResults) and S3
gateways. Credentials go in the URL (`https://user:token@host/`) or ~/.netrc.
"""

from __future__ import annotations

from pathlib import Path

from rfs.remote.base import MAX_RECORD_BYTES
from rfs.remote.codec import BadObject, ObjectRef
from rfs.remote.config import RemoteSettings
from rfs.remote.transport import (
    download,
    make_session,
    object_deadline_s,
    read_bounded,
    status_error,
    translating,
)


class HttpBackend:
    """A Bazel-style HTTP cache at `url`."""

    def __init__(self, url: str, settings: RemoteSettings) -> None:
        self.url = url
        self._base = url.rstrip("/") + "/"
        self._session = make_session(settings)
        self._timeout = (settings.connect_timeout_s, settings.timeout_s)
        self._deadline = settings.record_deadline_s

    def _url(self, kind: str, name: str) -> str:
        return f"{self._base}{kind}/{name}"

    def get_record(self, name: str) -> bytes | None:
        """GET ac/<name>; None on 404."""
        what = f"read record {name[:12]}…"
        with (
            translating(self.url, what),
            self._session.get(self._url("ac", name), timeout=self._timeout, stream=True) as resp,
        ):
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise status_error(self.url, what, resp)
            return read_bounded(
                resp, MAX_RECORD_BYTES, self._deadline, self.url, f"record {name[:12]}…"
            )

    def put_record(self, name: str, data: bytes, objects: list[ObjectRef]) -> None:
        """PUT ac/<name> (the objects are in cas/ already)."""
        what = f"write record {name[:12]}…"
        with translating(self.url, what):
            resp = self._session.put(
                self._url("ac", name),
                data=data,
                timeout=self._timeout,
                headers={"Content-Type": "application/json"},
            )
            if resp.status_code not in (200, 201, 204):
                raise status_error(self.url, what, resp)

    def has_object(self, ref: ObjectRef) -> bool:
        """HEAD cas/<sha256>, trusting a matching Content-Length."""
        what = f"look up object {ref.sha256[:12]}…"
        with translating(self.url, what):
            resp = self._session.head(self._url("cas", ref.sha256), timeout=self._timeout)
            if resp.status_code == 404:
                return False
            if resp.status_code != 200:
                raise status_error(self.url, what, resp)
            length = resp.headers.get("Content-Length")
            return length is None or (length.isdigit() and int(length) == ref.size)

    def get_object(self, ref: ObjectRef, dest: Path) -> None:
        """GET cas/<sha256> into `dest`."""
        what = f"download object {ref.sha256[:12]}…"
        with (
            translating(self.url, what),
            self._session.get(
                self._url("cas", ref.sha256), timeout=self._timeout, stream=True
            ) as resp,
        ):
            if resp.status_code == 404:
                raise BadObject(
                    f"remote cache {self.url}: object {ref.sha256[:12]}… is missing on the server"
                )
            if resp.status_code != 200:
                raise status_error(self.url, what, resp)
            download(resp, dest, ref.size, self.url, object_deadline_s(self._deadline, ref.size))

    def put_object(self, ref: ObjectRef, path: Path) -> None:
        """PUT cas/<sha256>, streaming the file."""
        what = f"upload object {ref.sha256[:12]}…"
        with translating(self.url, what), path.open("rb") as f:
            resp = self._session.put(
                self._url("cas", ref.sha256),
                data=f,
                timeout=self._timeout,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(ref.size),
                },
            )
            if resp.status_code not in (200, 201, 204):
                raise status_error(self.url, what, resp)

    def close(self) -> None:
        """Close the connection pool."""
        self._session.close()
