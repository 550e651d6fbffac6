"""/etc/hosts, /etc/hostname and /etc/resolv.conf: the files engines manage themselves.

Docker and Podman bind-mount their own versions of these files into every container, so what
a setup command writes there never reaches the committed layer, and `docker export` shows them
as empty files. rfs bind-mounts its own copies instead, seeded with working values, and after
each command keeps whatever the command changed; the export filter then puts those writes
back into the image where the export shows an empty file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

MANAGED = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")

DEFAULT_HOSTS = (
    b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    b"ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def host_resolv_conf(
    candidates: tuple[Path, ...] = (
        Path("/etc/resolv.conf"),
        Path("/run/systemd/resolve/resolv.conf"),
    ),
) -> bytes | None:
    """The host's DNS configuration as a container can use it, or None.

    Loopback name servers (systemd-resolved's 127.0.0.53, say) are unreachable from a bridged
    container, so they are dropped, as Docker does; None when nothing usable remains.
    """
    for path in candidates:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        kept = [
            ln
            for ln in lines
            if not (
                ln.split()[:1] == ["nameserver"]
                and len(ln.split()) > 1
                and _is_loopback(ln.split()[1])
            )
        ]
        if any(ln.split()[:1] == ["nameserver"] for ln in kept):
            return ("\n".join(kept) + "\n").encode()
    return None


def seed(written: Mapping[str, bytes], hostname: str | None) -> dict[str, bytes]:
    """What a command sees in each managed file: earlier commands' writes, else defaults."""
    defaults: dict[str, bytes | None] = {
        "/etc/hosts": DEFAULT_HOSTS,
        "/etc/hostname": ((hostname or "localhost") + "\n").encode(),
        "/etc/resolv.conf": host_resolv_conf(),
    }
    seeded = {}
    for path in MANAGED:
        value = written.get(path, defaults[path])
        if value is not None:
            seeded[path] = value
    return seeded


def scratch_name(path: str) -> str:
    """The file name under a step's scratch directory that stands for `path`."""
    return "etc-" + path.rsplit("/", 1)[-1]


def collect(
    scratch: Path, seeded: Mapping[str, bytes], written: Mapping[str, bytes]
) -> dict[str, bytes]:
    """Earlier writes plus whatever this command changed in the files it was given."""
    result = dict(written)
    for path, before in seeded.items():
        try:
            after = (scratch / scratch_name(path)).read_bytes()
        except OSError:
            continue
        if after != before:
            result[path] = after
    return result
