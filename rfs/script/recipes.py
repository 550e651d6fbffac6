"""The schema of the recipe tables, `[[copy]]` and `[[outputs]]` (see rfs.script.schema)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rfs.script.model import Copy, Output

if TYPE_CHECKING:
    from rfs.script.reader import Reader


def copy_entry(r: Reader, data: Mapping[str, Any], p: str) -> Copy:
    """One `[[copy]]` table at `p`."""
    r.check_keys(data, "copy", p)
    for key in ("source", "destination"):
        if data.get(key) is None:
            r.error(f"{p}.{key}", "is required")
    return Copy(
        source=r.image_path(data, "source", f"{p}.source") or "",
        destination=r.image_path(data, "destination", f"{p}.destination") or "",
        mode=r.count(data, "mode", f"{p}.mode", maximum=0o7777),
        uid=r.count(data, "uid", f"{p}.uid"),
        gid=r.count(data, "gid", f"{p}.gid"),
    )


def output_entry(r: Reader, data: Mapping[str, Any], p: str) -> Output:
    """One `[[outputs]]` table at `p`; `to` defaults to the file name of `path`."""
    r.check_keys(data, "outputs", p)
    path = r.image_path(data, "path", f"{p}.path")
    if data.get("path") is None:
        r.error(f"{p}.path", "is required")
    elif path == "/":
        r.error(f"{p}.path", "must name a file, not /")
    to = r.text(data, "to", f"{p}.to")
    if to is None and path:
        to = path.rsplit("/", 1)[-1]
    elif to is not None:
        parts = [part for part in to.split("/") if part not in ("", ".")]
        if to.startswith("/") or ".." in parts or not parts or "\x00" in to:
            r.error(
                f"{p}.to",
                f"{to!r} must be a file name relative to the image's directory, without '..'",
            )
        to = "/".join(parts)
    return Output(
        path=path or "", to=to or "", remove=r.get(data, "remove", f"{p}.remove", bool, False)
    )
