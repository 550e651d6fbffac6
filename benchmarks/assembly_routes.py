"""Two ways from one export tarball to an ext4 image, timed and weighed (needs root, for the
loop mount of the second):

- rfs: the export through rfs's filter into `mke2fs -d -`, writing a sparse file;
- dd: buildfs's way: `dd` zeros for the whole size, `mkfs.ext4`, loop mount, `tar -x` with
  owners, modes and xattrs, umount.

Both end with their data on disk (the mount route's umount flushes; the rfs image is fsync'ed),
so neither wins by leaving writes in the page cache. Reports the median wall time of `--runs`
runs, the bytes each route wrote (`ru_oublock` of rfs and its children) and the image's
allocated bytes (`st_blocks`: mkfs.ext4 discards the zeros dd wrote, so both end up sparse),
as a Markdown table.

    python benchmarks/assembly_routes.py [--export TAR | --image debian:bookworm-slim]
                                         [--size-mib 1024] [--runs 5]

Without --export, the image is exported once with the docker CLI (not timed).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rfs.fs.ext4 import assemble_ext4
from rfs.fs.tarstream import Selection

DOCKER = "/usr/bin/docker"  # Debian's client; another one may shadow it on PATH


def rfs_route(export: Path, image: Path, size_mib: int) -> None:
    assemble_ext4(
        export, Selection(), [], image, size_mib=size_mib, seed=bytes(32), source_date_epoch=0
    )
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_route(export: Path, image: Path, size_mib: int) -> None:
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={image}", "bs=1M", f"count={size_mib}", "status=none"],
        check=True,
    )
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-mnt-") as mnt:
        subprocess.run(["mount", "-o", "loop", str(image), mnt], check=True)
        try:
            subprocess.run(
                [
                    "tar",
                    "-x",
                    "-f",
                    str(export),
                    "-C",
                    mnt,
                    "--numeric-owner",
                    "-p",
                    "--xattrs",
                    "--xattrs-include=*",
                ],
                check=True,
            )
        finally:
            subprocess.run(["umount", mnt], check=True)


ROUTES: dict[str, tuple[str, Callable[[Path, Path, int], None]]] = {
    "rfs": ("export → filter → `mke2fs -d -` (sparse, no root)", rfs_route),
    "dd": ("dd zeros + mkfs.ext4 + loop mount + `tar -x` + umount (root)", dd_route),
}


def export_image(image: str, dest: Path) -> None:
    """`docker export` of a container created (never started) from `image`."""
    cid = subprocess.run(
        [DOCKER, "create", image, "/bin/true"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with dest.open("wb") as out:
            subprocess.run([DOCKER, "export", cid], stdout=out, check=True)
    finally:
        subprocess.run([DOCKER, "rm", "-f", cid], capture_output=True, check=False)


def measure(export: Path, size_mib: int, runs: int, workdir: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in ROUTES}
    allocated: dict[str, list[float]] = {name: [] for name in ROUTES}
    written: dict[str, list[float]] = {name: [] for name in ROUTES}
    for _ in range(runs):
        for name, (_, route) in ROUTES.items():  # interleaved: drift hits both alike
            image = workdir / f"{name}.ext4"
            image.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            w0 = _written()
            t0 = time.perf_counter()
            route(export, image, size_mib)
            times[name].append(time.perf_counter() - t0)
            written[name].append(_written() - w0)
            allocated[name].append(image.stat().st_blocks * 512)
            image.unlink()
    return {
        **{f"{n}:time": t for n, t in times.items()},
        **{f"{n}:alloc": a for n, a in allocated.items()},
        **{f"{n}:written": w for n, w in written.items()},
    }


def _written() -> int:
    """Bytes written to block devices so far by this process and its waited-for children."""
    blocks = sum(
        resource.getrusage(who).ru_oublock
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return blocks * 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="an export tarball to use")
    parser.add_argument(
        "--image", default="debian:bookworm-slim", help="image to export when --export is not given"
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the dd route needs root (loop mount)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-routes-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        export = args.export
        if export is None:
            export = workdir / "export.tar"
            export_image(args.image, export)
        results = measure(export, args.size_mib, args.runs, workdir)
    mib = export.stat().st_size / (1 << 20) if export.exists() else float("nan")
    print(
        f"export: {args.export or args.image} ({mib:.0f} MiB), image {args.size_mib} MiB, "
        f"median of {args.runs} runs\n"
    )
    print("| route | time (median) | min-max | written | allocated |")
    print("|---|---|---|---|---|")
    for name, (label, _) in ROUTES.items():
        t = results[f"{name}:time"]
        alloc = statistics.median(results[f"{name}:alloc"]) / (1 << 20)
        wrote = statistics.median(results[f"{name}:written"]) / (1 << 20)
        print(
            f"| {label} | {statistics.median(t):.2f} s | {min(t):.2f}-{max(t):.2f} s | "
            f"{wrote:.0f} MiB | {alloc:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
