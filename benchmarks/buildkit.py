"""The BuildKit baseline: the package as a Dockerfile, `docker build -o type=tar`, `mkfs.ext4 -d`.

What a user without rfs would write today: a Dockerfile FROM the same local base image with one
RUN per command (same environment, user and working directory; scripts bind-mounted from the
build context, as rfs copies them in), the overlays COPYed last, BuildKit's tar output of the
final filesystem, and `mkfs.ext4 -d TARBALL` (e2fsprogs ≥ 1.47.1 reads a tarball) at the size
rfs gives the image. Nothing is cached (`--no-cache`): it is compared with rfs's cold build.
An `[export.directories]` selection is applied by a last RUN that removes every other top-level
entry and empties the `create` directories (only top-level `include` entries are honoured; the
examples use no other). Needs no root.

    python -m benchmarks.buildkit PACKAGE OUTPUT SIZE_MIB

Docker 20.10's built-in BuildKit (DOCKER_BUILDKIT=1, no buildx) resolves `FROM` in the local
image store, so no registry is needed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rfs.script.model import BuildScript
from rfs.script.package import load, resolve_reference

DOCKER = "/usr/bin/docker"
_MOUNTED = ("/proc", "/sys", "/dev")  # mounted in every RUN: never removed


def _json(values: list[str]) -> str:
    import json

    return json.dumps(values)


def dockerfile(script: BuildScript, context: Path) -> str:
    """Write the build context for `script` into `context`; return the Dockerfile's text."""
    if script.container.image is None:
        raise SystemExit("the BuildKit baseline needs a base image by name (not an archive)")
    root = script.package_root or Path("/")
    scripts = context / "scripts"
    scripts.mkdir()
    lines = [f"FROM {script.container.image.ref}"]
    if script.container.env:
        lines.append("ENV " + " ".join(f"{k}={shlex.quote(v)}" for k, v in script.container.env))
    for i, cmd in enumerate(script.commands):
        if cmd.uid or cmd.gid:
            lines.append(f"USER {cmd.uid or 0}:{cmd.gid or 0}")
        if cmd.working_dir:
            lines.append(f"WORKDIR {cmd.working_dir}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env)
        if cmd.command is not None:
            argv = cmd.command.split()
            envs = [f"{k}={v}" for k, v in cmd.env]
            run = f"RUN {_json(['env', *envs, *argv] if envs else argv)}"
        else:
            body = (
                (cmd.script_inline or "").encode()
                if cmd.script_inline is not None
                else resolve_reference(root, cmd.script_path or "").read_bytes()
            )
            (scripts / f"script-{i}").write_bytes(body)
            first = body.split(b"\n", 1)[0]
            interp = first[2:].decode().split() if first.startswith(b"#!") else ["/bin/sh"]
            run = (
                "RUN --mount=type=bind,source=scripts,target=/.bench "
                f"{env} {shlex.join([*interp, f'/.bench/script-{i}'])}"
            )
        lines.append(run)
        if cmd.uid or cmd.gid:
            lines.append("USER 0:0")
        if cmd.working_dir:
            lines.append("WORKDIR /")
    dirs = script.export.directories
    if dirs.include:
        keep = {p.strip("/").split("/")[0] for p in (*dirs.include, *_MOUNTED)}
        case = "|".join(f"/{k}" for k in sorted(keep))
        create = " ".join(shlex.quote(p) for p in dirs.create if p not in _MOUNTED)
        trim = f'for e in /* /.[!.]*; do case "$e" in {case}) ;; *) rm -rf "$e";; esac; done'
        if create:
            trim += f"; rm -rf {create}; mkdir -p {create}"
        lines.append(f"RUN {_json(['/bin/sh', '-c', trim])}")
    ovl = context / "overlays"
    ovl.mkdir()
    for i, overlay in enumerate(script.overlays):
        src = ovl / str(i)
        if overlay.source_inline is not None:
            src.write_text(overlay.source_inline)
        elif overlay.is_directory:
            shutil.copytree(resolve_reference(root, overlay.source or ""), src, symlinks=True)
        else:
            shutil.copyfile(resolve_reference(root, overlay.source or ""), src)
        dest = overlay.destination.rstrip("/") + ("/" if overlay.is_directory else "")
        lines.append(f"COPY overlays/{i} {dest}")
    return "\n".join(lines) + "\n"


def build(package: Path, output: Path, size_mib: int) -> None:
    """Build `package` into the ext4 image `output` with BuildKit and mkfs.ext4."""
    script = load(package).script
    work = Path(tempfile.mkdtemp(prefix="rfs-buildkit-", dir=output.parent))
    try:
        context = work / "context"
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile(script, context))
        tarball = work / "rootfs.tar"
        subprocess.run(
            [DOCKER, "build", "--no-cache", "-q", "-o", f"type=tar,dest={tarball}", str(context)],
            check=True,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(tarball), str(output), f"{size_mib}M"], check=True
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m benchmarks.buildkit PACKAGE OUTPUT SIZE_MIB")
    build(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
