"""Remote caches shared by CI runners and laptops: one `Backend` interface, two real backends.

    http(s)://host/prefix   the Bazel remote-cache HTTP protocol (`ac/`, `cas/`): nginx WebDAV,
                            bazel-remote, S3 gateways              (rfs.remote.http)
    oci://host/repository   an OCI registry, records as OCI artifacts  (rfs.remote.oci)

`rfs.remote.sync.RemoteCache` is what a build uses: lazy lookups while planning, verified
downloads of only what the plan needs, uploads of what the build made.

May import `rfs.run` (the executor and store it fetches into and pushes from), `rfs.report`,
`rfs.graph`, `rfs.script`, `rfs.host` and `rfs.errors`; the pipeline drives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at run time, imported where used: `rfs build` parses its options from
    # rfs.remote.config without needing the backends' types
    from rfs.remote.base import Backend
    from rfs.remote.config import RemoteSettings

__all__ = ["Backend", "RemoteSettings", "open_backend"]


def open_backend(url: str, settings: RemoteSettings) -> Backend:
    """The backend for `url` (no request is made here)."""
    from rfs.remote.config import check_url

    check_url(url)
    if url.startswith("oci://"):
        from rfs.remote.oci import OciBackend

        return OciBackend(url, settings, insecure=settings.insecure)
    from rfs.remote.http import HttpBackend

    return HttpBackend(url, settings)
