"""The uncached baseline: buildfs's pipeline, done by the same engine with the same commands.

One container runs every command in turn; then `docker export`, extraction with GNU tar
(keeping owners, modes and xattrs, so the result is comparable), `dd` of zeros, `mkfs.ext4`,
a loop mount, a copy, the overlays, and unmount. Needs root (the loop mount), like buildfs.

    python -m benchmarks.baseline PACKAGE OUTPUT
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from rfs.script.model import BuildScript
from rfs.script.package import load, resolve_reference

DOCKER = shutil.which("docker", path="/usr/bin:/bin") or "docker"


def _run(
    argv: list[str], *, stdout: int | IO[bytes] | None = None, capture_output: bool = False
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, stdout=stdout, capture_output=capture_output)


def _command_argv(script: BuildScript, index: int, scratch: Path) -> list[str]:
    cmd = script.commands[index]
    if cmd.command is not None:
        return cmd.command.split()
    body = (
        (cmd.script_inline or "").encode()
        if cmd.script_inline is not None
        else resolve_reference(script.package_root or Path("/"), cmd.script_path or "").read_bytes()
    )
    (scratch / f"script-{index}").write_bytes(body)
    first = body.split(b"\n", 1)[0]
    interp = first[2:].decode().split() if first.startswith(b"#!") else ["/bin/sh"]
    return [*interp, f"/.bench/script-{index}"]


def build(package: Path, output: Path) -> None:
    """Build `package` into `output` the uncached way."""
    script = load(package).script
    work = Path(tempfile.mkdtemp(prefix="rfs-baseline-"))
    scratch = work / "scripts"
    scratch.mkdir()
    if script.container.image is None:
        raise SystemExit("the baseline needs a base image by name (not an archive)")
    image = script.container.image.ref
    cid = (
        _run(
            [
                DOCKER,
                "run",
                "-d",
                "--entrypoint",
                "",
                "-v",
                f"{scratch}:/.bench:ro",
                image,
                "sleep",
                "infinity",
            ],
            capture_output=True,
        )
        .stdout.decode()
        .strip()
    )
    try:
        for i, cmd in enumerate(script.commands):
            argv = _command_argv(script, i, scratch)
            env = [f"--env={k}={v}" for k, v in (*script.container.env, *cmd.env)]
            user = [f"--user={cmd.uid or 0}:{cmd.gid or 0}"] if cmd.uid or cmd.gid else []
            wd = [f"--workdir={cmd.working_dir}"] if cmd.working_dir else []
            _run([DOCKER, "exec", *env, *user, *wd, cid, *argv], stdout=subprocess.DEVNULL)
        tarball = work / "export.tar"
        with tarball.open("wb") as f:
            _run([DOCKER, "export", cid], stdout=f)
    finally:
        _run([DOCKER, "rm", "-f", cid], stdout=subprocess.DEVNULL)
    tree = work / "tree"
    tree.mkdir()
    _run(
        [
            "tar",
            "-C",
            str(tree),
            "-xpf",
            str(tarball),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ]
    )
    size = script.filesystem.size_mib or 1024
    _run(["dd", "if=/dev/zero", f"of={output}", "bs=1M", f"count={size}", "status=none"])
    _run(["mkfs.ext4", "-q", "-F", str(output)])
    mnt = work / "mnt"
    mnt.mkdir()
    _run(["mount", "-o", "loop", str(output), str(mnt)])
    try:
        _run(["cp", "-a", f"{tree}/.", str(mnt)])
        for overlay in script.overlays:
            dest = mnt / overlay.destination.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if overlay.source_inline is not None:
                dest.write_text(overlay.source_inline)
            elif overlay.is_directory:
                src = resolve_reference(script.package_root or Path("/"), overlay.source or "")
                _run(["cp", "-a", f"{src}/.", str(dest)])
            else:
                src = resolve_reference(script.package_root or Path("/"), overlay.source or "")
                shutil.copyfile(src, dest)
    finally:
        _run(["umount", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or os.geteuid() != 0:
        sys.exit("usage (as root): python -m benchmarks.baseline PACKAGE OUTPUT")
    build(Path(sys.argv[1]), Path(sys.argv[2]))
