"""Novel edits of a package's working copy, one per benchmark run, and a small TOML writer.

Every edit carries a fresh token, so no run can be served by an entry an earlier run made.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCKER = "/usr/bin/docker"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """Write the subset of TOML build scripts use: tables, arrays of tables, inline values."""
    out = io.StringIO()
    for name, section in doc.items():
        if isinstance(section, list):
            for item in section:
                out.write(f"[[{name}]]\n")
                for k, v in item.items():
                    out.write(f"{k} = {_toml_value(v)}\n")
                out.write("\n")
        elif isinstance(section, dict):
            plain = {
                k: v
                for k, v in section.items()
                if not isinstance(v, dict) or k == "image" or k == "env" or k == "volumes"
            }
            out.write(f"[{name}]\n")
            for k, v in plain.items():
                out.write(f"{k} = {_toml_value(v)}\n")
            out.write("\n")
            for k, v in section.items():
                if k not in plain:
                    out.write(f"[{name}.{k}]\n")
                    for kk, vv in v.items():
                        out.write(f"{kk} = {_toml_value(vv)}\n")
                    out.write("\n")
    return out.getvalue()


def _edit_script(pkg: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = pkg / "build.toml"
    doc = tomllib.loads(path.read_text())
    change(doc)
    path.write_text(dump_toml(doc))


def edit_overlay(pkg: Path, token: str) -> None:
    """Change the content of the first overlay (a package file, else an inline text)."""
    doc = tomllib.loads((pkg / "build.toml").read_text())
    for overlay in doc.get("overlays", []):
        if "source" in overlay and not overlay.get("is_directory"):
            target = pkg / overlay["source"].lstrip("/")
            target.write_text(target.read_text() + f"# {token}\n")
            return

    def change(d: dict[str, Any]) -> None:
        d["overlays"][0]["source_inline"] += f"\n# {token}\n"

    _edit_script(pkg, change)


def edit_command(pkg: Path, index: int, token: str) -> None:
    """Change command `index` by an environment variable: the same work, a new key."""

    def change(d: dict[str, Any]) -> None:
        cmd = d["commands"][index]
        cmd["env"] = {**cmd.get("env", {}), "RFS_BENCH_TOKEN": token}

    _edit_script(pkg, change)


def new_base(pkg: Path, token: str) -> str:
    """Commit a copy of the package's base image with one extra file; point the package at it."""
    doc = tomllib.loads((pkg / "build.toml").read_text())
    image = doc["container"]["image"]
    source = f"{image['name']}:{image['tag']}"
    tag = f"rfs-bench/base:{token}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/rfs-bench-token")
        data = token.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cid = subprocess.run(
        [DOCKER, "create", source, "/bin/true"], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(
            [DOCKER, "cp", "-", f"{cid}:/"], input=buf.getvalue(), check=True, capture_output=True
        )
        subprocess.run([DOCKER, "commit", cid, tag], check=True, capture_output=True)
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], check=True, capture_output=True)

    def change(d: dict[str, Any]) -> None:
        d["container"]["image"] = {"name": "rfs-bench/base", "tag": token}

    _edit_script(pkg, change)
    return tag


# The late command #16 times: a trivial `touch`, appended to each package of the edits suite and
# changed to a new name for each late-command edit (new work, new key, a near-empty layer).
LATE_PREFIX = "touch /etc/rfs-late"


def add_late_command(pkg: Path) -> None:
    """Append one trailing command, a `touch` (buildfs's README example + a late command)."""

    def change(d: dict[str, Any]) -> None:
        d["commands"] = [*d.get("commands", []), {"command": LATE_PREFIX}]

    _edit_script(pkg, change)


def edit_late_touch(pkg: Path, token: str) -> None:
    """Make the last command `touch` a new file: a changed late command, of trivial cost."""

    def change(d: dict[str, Any]) -> None:
        d["commands"][-1] = {"command": f"{LATE_PREFIX}-{token}"}

    _edit_script(pkg, change)


BIG_BYTES = 1536 * 2**20  # 1.5 GiB


def make_big(pkg: Path) -> None:
    """The "big" package: the busybox example whose first command writes 1.5 GiB of random data
    (incompressible, and real blocks, not a hole) to /opt/big; sized 2 GiB."""

    def change(d: dict[str, Any]) -> None:
        big = {
            "script_inline": (
                f"#!/bin/sh\nmkdir -p /opt\nhead -c {BIG_BYTES} /dev/urandom > /opt/big\n"
            )
        }
        d["commands"] = [big, *d.get("commands", [])]
        d["filesystem"]["size_mib"] = 2048

    _edit_script(pkg, change)
