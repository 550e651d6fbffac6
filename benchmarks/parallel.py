#!/usr/bin/env python3
"""Benchmark: several packages as one graph (#17), `-j 1` against `-j N`, side by side.

    python benchmarks/parallel.py [--packages 4] [--sleep 2] [--jobs 4] [--runs 3] [--json FILE]

A family of `--packages` busybox packages: a shared first command that sleeps `--sleep` seconds,
then one of each package's own that sleeps as long, then a `touch`. Their keys carry a marker
new to each run, so no cache of an earlier run serves them. Each run builds the family twice
from an empty cache, as one `rfs build PKG... --output-dir DIR` process: with `-j 1` and with
`-j N`; the two builds alternate which goes first. The work is known: `-j 1` sleeps
(1 + packages) * sleep seconds, `-j N` (N ≥ packages) 2 * sleep; the rest is rfs and the engine
(a container per command, an export and an image per package). Every layer image and cache
directory is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cachefiles import layer_tags  # noqa: E402
from tests.constants import BUSYBOX_IMAGE  # noqa: E402

DOCKER = "/usr/bin/docker"  # Debian's client; another one may shadow it on PATH


def family(root: Path, packages: int, sleep: float) -> list[Path]:
    """The packages of one run, with keys no earlier run made."""
    marker = uuid.uuid4().hex
    made = []
    for i in range(packages):
        pkg = root / f"p{i}"
        pkg.mkdir(parents=True)
        (pkg / "build.toml").write_text(
            f"[filesystem]\nsize_mib = 16\n\n[container]\n{BUSYBOX_IMAGE}\n"
            f'env = {{ MARKER = "{marker}" }}\n\n'
            f'[[commands]]\ncommand = "sleep {sleep}"\n\n'
            f'[[commands]]\ncommand = "sleep {sleep}"\nenv = {{ OWN = "{i}" }}\n\n'
            f'[[commands]]\ncommand = "touch /etc/p{i}"\n'
        )
        made.append(pkg)
    return made


def build(packages: list[Path], out: Path, cache: Path, jobs: int) -> dict[str, Any]:
    """One timed `rfs build` of every package; its wall time and the steps it ran."""
    out.mkdir()
    argv = [sys.executable, "-m", "rfs", "build", *map(str, packages)]
    argv += ["--output-dir", str(out), "-j", str(jobs), "--json"]
    env = {"RFS_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"rfs build -j {jobs} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines()]
    ran = [e["step"] for e in events if e["event"] == "step_finished"]
    return {"jobs": jobs, "wall": round(wall, 3), "ran": len(ran)}


def drop_layers(*caches: Path) -> None:
    """Remove the layer images the runs committed."""
    tags = sorted({t for c in caches for t in layer_tags(c)})
    if tags:
        subprocess.run([DOCKER, "rmi", "-f", *tags], capture_output=True, check=False)


def main() -> int:
    """Run the builds and print a table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packages", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each sleep takes")
    parser.add_argument("--jobs", type=int, default=4, help="N of the -j N build")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rfs-bench-parallel-") as tmp:
        work = Path(tmp)
        caches: list[Path] = []
        try:
            for run in range(args.runs):
                packages = family(work / f"run{run}", args.packages, args.sleep)
                order = (1, args.jobs) if run % 2 == 0 else (args.jobs, 1)
                for jobs in order:
                    cache = work / f"cache-{run}-{jobs}"
                    caches.append(cache)
                    out = work / f"out-{run}-{jobs}"
                    samples.append({"run": run, **build(packages, out, cache, jobs)})
                    print(f"run {run}: -j {jobs}: {samples[-1]['wall']:.2f} s", file=sys.stderr)
        finally:
            drop_layers(*caches)
            shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(s["wall"] for s in samples if s["jobs"] == 1)
    many = statistics.median(s["wall"] for s in samples if s["jobs"] == args.jobs)
    sleeping = {1: (1 + args.packages) * args.sleep, args.jobs: 2 * args.sleep}
    print(f"{args.packages} packages, sleep {args.sleep:g} s, {args.runs} run(s)")
    print("| build | median s | of which sleeping |")
    print("|---|---|---|")
    print(f"| -j 1 | {one:.2f} | {sleeping[1]:g} |")
    print(f"| -j {args.jobs} | {many:.2f} | {sleeping[args.jobs]:g} |")
    print(f"-j 1 ÷ -j {args.jobs}: {one / many:.2f}")
    if args.json:
        figures = {"args": vars(args) | {"json": str(args.json)}, "samples": samples}
        figures["ratio"] = round(one / many, 3)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
