"""`oci://host[:port]/repository` remote caches on an OCI registry (distribution API v2).

Layout in the repository:
    objects  registry blobs (`sha256:<hex>`), uploaded with a monolithic POST + PUT;
    records  OCI artifacts: an image manifest tagged with the record name (64 hex digits),
             `artifactType` application/vnd.rfs.step.v1, whose config blob is the record JSON
             and whose layers are the objects the record names, so the registry's garbage
             collector keeps exactly what a record needs, and `oras pull` can fetch a step.

A registry on a loopback address is reached over plain HTTP, as Docker does; any other over
HTTPS, unless `insecure` (RFS_CACHE_INSECURE=1 or `insecure = true` in the config file).
Credentials: `oci://user:token@host/repo`, else the Docker client's config
(~/.docker/config.json, with its credential helpers), through the docker SDK. Token auth
(the `WWW-Authenticate: Bearer` challenge) and basic auth are both answered.

Why not the `oras` Python package (oras-py 0.2.x): its requests carry no time-out, so a hung
registry hangs the build; its retry decorator sleeps 3+5+11+29+83 s on a dead server, which is
neither bounded nor short; and its uploads read each blob whole into memory. rfs needs all
three the other way, so it speaks the (small, stable) distribution API itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import requests

from rfs.errors import UsageError
from rfs.remote.base import MAX_RECORD_BYTES, is_loopback
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

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.rfs.step.v1"
RECORD_TYPE = "application/vnd.rfs.step.record.v2"  # rfs.remote.record: a header, then JSON
MAX_MANIFEST_BYTES = 4 << 20  # a record's manifest lists its objects: a few KiB
MAX_TOKEN_ANSWER = 64 << 10  # a registry's token answer: a JWT and a few fields
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,16384}")
OBJECT_TYPE = "application/vnd.rfs.object.v1+zstd"


def parse_oci_url(url: str) -> tuple[str, str, str | None, str | None]:
    """(host[:port], repository, user, password) of an `oci://` URL."""
    parts = urllib.parse.urlsplit(url)
    repo = parts.path.strip("/")
    if parts.scheme != "oci" or not parts.hostname or not repo:
        raise UsageError(f"not an OCI cache URL: {url!r} (expected oci://host[:port]/repository)")
    if repo != repo.lower():
        raise UsageError(f"OCI repository names are lower case: {repo!r}")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if ":" in (parts.hostname or "") and not host.startswith("["):
        host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return host, repo, user, password


def _record_blob(manifest: bytes, what: str) -> tuple[str, int]:
    """The digest and size of the record a manifest names; BadObject unless it is an rfs
    record's manifest (the digest goes into a URL: it must be exactly sha256:<64 hex>)."""
    try:
        config = json.loads(manifest)["config"]
        digest, size = config["digest"], config["size"]
        media = config.get("mediaType")
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise BadObject(f"{what} is not an rfs record") from exc
    if (
        media != RECORD_TYPE
        or not isinstance(digest, str)
        or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
        or type(size) is not int
        or not 0 <= size <= MAX_RECORD_BYTES
    ):
        raise BadObject(f"{what} is not an rfs record")
    return digest, size


class OciBackend:
    """A cache in repository `repo` of the registry at `host`."""

    def __init__(self, url: str, settings: RemoteSettings, insecure: bool = False) -> None:
        self.host, self.repo, user, password = parse_oci_url(url)
        self.url = f"oci://{self.host}/{self.repo}"
        hostname = urllib.parse.urlsplit(url).hostname or ""
        scheme = "http" if insecure or is_loopback(hostname) else "https"
        self._base = f"{scheme}://{self.host}/v2/{self.repo}"
        self._session = make_session(settings)
        self._timeout = (settings.connect_timeout_s, settings.timeout_s)
        self._deadline = settings.record_deadline_s
        self._basic = (user, password or "") if user else self._docker_credentials()
        self._token: str | None = None

    # -- auth ------------------------------------------------------------------------------

    def _docker_credentials(self) -> tuple[str, str] | None:
        try:
            import docker.auth

            config = docker.auth.load_config()
            found = docker.auth.resolve_authconfig(config, self.host)
        except Exception:  # a broken or absent Docker config only means: anonymous
            return None
        if not found:
            return None
        user = found.get("username") or found.get("Username")
        password = found.get("password") or found.get("Password") or ""
        return (str(user), str(password)) if user else None

    def _authenticate(self, resp: requests.Response) -> bool:
        """Answer a 401 challenge; True if the request should be repeated."""
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self._basic is None or self._session.auth is not None:
                return False
            self._session.auth = self._basic
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(
            (k.strip(), v.strip().strip('"'))
            for k, _, v in (p.partition("=") for p in _split_params(params))
        )
        realm = fields.pop("realm", None)
        if not realm:
            return False
        fields.setdefault("scope", f"repository:{self.repo}:pull,push")
        # The registry names where our credentials go: only over TLS, unless the registry
        # itself is spoken to in plain http (loopback or `insecure`), as Docker does.
        if not (
            realm.startswith("https://")
            or (realm.startswith("http://") and self._base.startswith("http://"))
        ):
            return False
        with self._session.get(
            realm, params=fields, auth=self._basic, timeout=self._timeout, stream=True
        ) as token_resp:
            if token_resp.status_code != 200:
                return False
            raw = read_bounded(
                token_resp, MAX_TOKEN_ANSWER, self._deadline, self.url, "the token answer"
            )
        try:
            body = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        token = body.get("token") or body.get("access_token")
        # A token travels in a header: anything but a short printable word could inject one.
        if not isinstance(token, str) or not _TOKEN.fullmatch(token) or token == self._token:
            return False
        self._token = str(token)
        self._session.headers["Authorization"] = f"Bearer {self._token}"
        return True

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        resp = self._session.request(method, url, **kwargs)
        if resp.status_code == 401 and self._authenticate(resp):
            body = kwargs.get("data")
            if body is not None and hasattr(body, "seek"):
                body.seek(0)
            resp = self._session.request(method, url, **kwargs)
        return resp

    # -- objects ---------------------------------------------------------------------------

    def _blob_url(self, digest: str) -> str:
        return f"{self._base}/blobs/{digest}"

    def has_object(self, ref: ObjectRef) -> bool:
        """HEAD the blob sha256:<hex>."""
        what = f"look up blob {ref.sha256[:12]}…"
        with translating(self.url, what):
            resp = self._request("HEAD", self._blob_url(f"sha256:{ref.sha256}"))
            if resp.status_code == 404:
                return False
            if resp.status_code != 200:
                raise status_error(self.url, what, resp)
            return True

    def get_object(self, ref: ObjectRef, dest: Path) -> None:
        """GET the blob (registries may redirect to their storage; requests follows)."""
        self._get_blob(f"sha256:{ref.sha256}", dest, ref.size)

    def _get_blob(self, digest: str, dest: Path, size: int) -> None:
        what = f"download blob {digest[7:19]}…"
        with (
            translating(self.url, what),
            self._request("GET", self._blob_url(digest), stream=True) as resp,
        ):
            if resp.status_code == 404:
                raise BadObject(
                    f"remote cache {self.url}: blob {digest[7:19]}… is missing in the registry"
                )
            if resp.status_code != 200:
                raise status_error(self.url, what, resp)
            download(resp, dest, size, self.url, object_deadline_s(self._deadline, size))

    def put_object(self, ref: ObjectRef, path: Path) -> None:
        """Upload the blob unless the registry has it: POST an upload, PUT the bytes."""
        if self.has_object(ref):
            return
        with path.open("rb") as f:
            self._put_blob(f"sha256:{ref.sha256}", f, ref.size)

    def _put_blob(self, digest: str, body: Any, size: int) -> None:
        what = f"upload blob {digest[7:19]}…"
        with translating(self.url, what):
            start = self._request("POST", f"{self._base}/blobs/uploads/")
            if start.status_code != 202 or "Location" not in start.headers:
                raise status_error(self.url, what, start)
            location = urllib.parse.urljoin(start.url, start.headers["Location"])
            sep = "&" if "?" in location else "?"
            resp = self._request(
                "PUT",
                f"{location}{sep}digest={urllib.parse.quote(digest)}",
                data=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
            if resp.status_code not in (201, 204):
                raise status_error(self.url, what, resp)

    # -- records ---------------------------------------------------------------------------

    def get_record(self, name: str) -> bytes | None:
        """GET the manifest tagged `name`, then its config blob (the record)."""
        what = f"read record {name[:12]}…"
        with translating(self.url, what):
            with self._request(
                "GET",
                f"{self._base}/manifests/{name}",
                stream=True,
                headers={"Accept": MANIFEST_TYPE},
            ) as resp:
                if resp.status_code == 404:
                    return None
                if resp.status_code != 200:
                    raise status_error(self.url, what, resp)
                body = read_bounded(
                    resp,
                    MAX_MANIFEST_BYTES,
                    self._deadline,
                    self.url,
                    f"the manifest of record {name[:12]}…",
                )
            digest, size = _record_blob(body, f"tag {name[:12]}…")
            with self._request("GET", self._blob_url(digest), stream=True) as resp:
                if resp.status_code != 200:
                    raise status_error(self.url, what, resp)
                data = read_bounded(resp, size, self._deadline, self.url, f"record {name[:12]}…")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BadObject(
                f"remote cache {self.url}: record {name[:12]}… does not match its digest"
            )
        return data

    def put_record(self, name: str, data: bytes, objects: list[ObjectRef]) -> None:
        """Upload the record as a config blob and tag a manifest naming it and its objects."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._put_blob(digest, data, len(data))
        layers = {ref.sha256: ref for ref in objects}  # a manifest lists each blob once
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": RECORD_TYPE, "digest": digest, "size": len(data)},
            "layers": [
                {"mediaType": OBJECT_TYPE, "digest": f"sha256:{r.sha256}", "size": r.size}
                for r in layers.values()
            ],
            "annotations": {"org.opencontainers.image.title": f"rfs step {name[:12]}"},
        }
        what = f"write record {name[:12]}…"
        with translating(self.url, what):
            resp = self._request(
                "PUT",
                f"{self._base}/manifests/{name}",
                data=json.dumps(manifest).encode(),
                headers={"Content-Type": MANIFEST_TYPE},
            )
            if resp.status_code not in (200, 201):
                raise status_error(self.url, what, resp)

    def close(self) -> None:
        """Close the connection pool."""
        self._session.close()


def _split_params(params: str) -> list[str]:
    """Split `a="x,y",b=c` at commas outside quotes."""
    out, cur, quoted = [], "", False
    for ch in params:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out
