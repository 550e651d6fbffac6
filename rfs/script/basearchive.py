"""Base image archives (`container.archive`): tell a `docker save`/OCI image archive from a
root filesystem tarball, and read the image ID a docker-archive's manifest names."""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import Problem, ScriptError
from rfs.script.archive import member_path


@dataclass(frozen=True)
class BaseArchive:
    """What a `container.archive` tarball holds."""

    is_image: bool  # a `docker save`/OCI image archive (else a root filesystem tarball)
    image_id: str | None = None  # the image ID a docker-archive's manifest names


def inspect_base_archive(path: Path, where: str = "container.archive") -> BaseArchive:
    """Tell an image archive (`docker save`, `podman save`) from a root filesystem tarball.

    Image archives carry `manifest.json` (docker-archive) or `index.json` plus `oci-layout`
    at the top; anything else is taken as the files of a root filesystem.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            names: dict[str, tarfile.TarInfo] = {}
            for member in tar:  # streamed: a big rootfs is read once, never held
                name = member_path(member.name)
                if name in ("manifest.json", "index.json", "oci-layout"):
                    names[name] = member
            if "manifest.json" in names:
                f = tar.extractfile(names["manifest.json"])
                manifest = json.loads(f.read()) if f is not None else None
                return BaseArchive(True, _manifest_image_id(manifest, path, where))
            if "index.json" in names and "oci-layout" in names:
                return BaseArchive(True)
            if not tar.getmembers():
                raise ScriptError([Problem(where, f"{path} is an empty tar archive")])
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ScriptError([Problem(where, f"{path} is not a readable tar archive: {exc}")]) from exc
    return BaseArchive(False)


def _manifest_image_id(manifest: object, path: Path, where: str) -> str | None:
    if not isinstance(manifest, list) or not manifest:
        return None
    if len(manifest) > 1:
        raise ScriptError(
            [
                Problem(
                    where,
                    f"{path} holds {len(manifest)} images; save exactly "
                    "one (docker save NAME:TAG -o FILE)",
                )
            ]
        )
    entry = manifest[0]
    config = entry.get("Config") if isinstance(entry, dict) else None
    if not isinstance(config, str):
        return None
    # "<hex>.json" (docker save before v25) or "blobs/sha256/<hex>" (OCI layout inside)
    digest = posixpath.basename(config).removesuffix(".json")
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return f"sha256:{digest}"
    return None
