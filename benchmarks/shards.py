#!/usr/bin/env python3
"""Benchmark: `rfs build --shard I/3` (#17): one runner against three shards, side by side.

    python benchmarks/shards.py [--packages 6] [--sleep 2] [--runs 2] [--json FILE]

A family of `--packages` busybox packages (benchmarks/parallel.py's): a shared first command
that sleeps `--sleep` seconds, then one of each package's own that sleeps as long, then a
`touch`. Their keys carry a marker new to each run, so no cache of an earlier run serves them.
Each run builds the family from empty caches three ways, in an order that rotates per run:

    one      one `rfs build PKG... --output-dir DIR -j 1` process
    one -j3  one process with `-j 3`
    shards   three processes started together, `--shard I/3 -j 1`, each with its own empty
             cache directory, meeting in one nginx cache (cache/nginx, started here); the
             figure is the wall time until the last of the three has every image

The work is known: `one` sleeps (1 + packages) * sleep seconds; three runners can do it in
about (1 + packages / 3) * sleep, plus each runner's downloads of what the others made. The
three processes share this machine's cores, as `-j 3` does: on three machines the shards would
not compete for the CPU and the disk. Layer images, caches and the server are removed at the end.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.parallel import drop_layers, family  # noqa: E402
from tests.cacheservers import start_nginx  # noqa: E402

WAYS = ("one", "one -j3", "shards")


def rfs_argv(packages: list[Path], out: Path, *extra: str) -> list[str]:
    """An `rfs build` of every package into `out`, with `--json`."""
    argv = [sys.executable, "-m", "rfs", "build", *map(str, packages)]
    return [*argv, "--output-dir", str(out), "--json", *extra]


def env_for(cache: Path) -> dict[str, str]:
    return {"RFS_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


def ran_steps(stdout: str) -> int:
    return sum(json.loads(line)["event"] == "step_finished" for line in stdout.splitlines())


def one(packages: list[Path], work: Path, jobs: int) -> dict[str, Any]:
    """One timed process building everything."""
    out, cache = work / "out", work / "cache"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        rfs_argv(packages, out, "-j", str(jobs)),
        capture_output=True,
        text=True,
        env=env_for(cache),
        check=False,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"rfs build -j {jobs} failed:\n{done.stderr[-3000:]}")
    return {"wall": round(wall, 3), "ran": ran_steps(done.stdout)}


def shards(packages: list[Path], work: Path, url: str) -> dict[str, Any]:
    """Three processes started together, one per shard; timed until the last ends."""
    procs = []
    # Each runner writes to files, not pipes: waiting for one runner while the others' pipes
    # fill would stop them in the middle of a write (a runner with --json writes a lot), and
    # the others would wait for its steps until their deadline.
    logs = [(work / f"shard-{i}.out", work / f"shard-{i}.err") for i in (1, 2, 3)]
    t0 = time.perf_counter()
    for i, (out_log, err_log) in zip((1, 2, 3), logs, strict=True):
        out = work / f"out-{i}"
        out.mkdir(parents=True)
        argv = rfs_argv(packages, out, "--shard", f"{i}/3", "--cache-to", url, "-j", "1")
        with out_log.open("w") as stdout, err_log.open("w") as stderr:
            procs.append(
                subprocess.Popen(
                    argv, stdout=stdout, stderr=stderr, env=env_for(work / f"cache-{i}")
                )
            )
    for proc in procs:
        proc.wait()
    wall = time.perf_counter() - t0
    results = [(out_log.read_text(), err_log.read_text()) for out_log, err_log in logs]
    for i, (p, (_, err)) in enumerate(zip(procs, results, strict=True), 1):
        if p.returncode != 0:
            raise SystemExit(f"a shard failed:\n{err[-3000:]}")
        for line in err.splitlines():  # a server fault or a late owner explains a slow run
            if "warning" in line or "deadline " in line:
                print(f"  shard {i}: {line.strip()}", file=sys.stderr)
    first = sorted((work / "out-1").iterdir())
    for i in (2, 3):  # every runner ends with every image, the same
        assert [f.read_bytes() for f in first] == [
            f.read_bytes() for f in sorted((work / f"out-{i}").iterdir())
        ]
    return {"wall": round(wall, 3), "ran": sum(ran_steps(out) for out, _ in results)}


def main() -> int:
    """Run the builds and print a table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packages", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each sleep takes")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    samples: list[dict[str, Any]] = []
    server = start_nginx()
    with tempfile.TemporaryDirectory(prefix="rfs-bench-shards-") as tmp:
        work = Path(tmp)
        try:
            for run in range(args.runs):
                packages = family(work / f"run{run}", args.packages, args.sleep)
                for k in range(len(WAYS)):
                    way = WAYS[(run + k) % len(WAYS)]
                    where = work / f"{run}-{way.replace(' ', '')}"
                    if way == "shards":
                        figures = shards(packages, where, server.url + f"run{run}/")
                    else:
                        figures = one(packages, where, 3 if way == "one -j3" else 1)
                    samples.append({"run": run, "way": way, **figures})
                    print(f"run {run}: {way}: {figures['wall']:.2f} s", file=sys.stderr)
        finally:
            drop_layers(*work.glob("*/cache*"))
            shutil.rmtree(work, ignore_errors=True)
            server.stop()
    median = {w: statistics.median(s["wall"] for s in samples if s["way"] == w) for w in WAYS}
    sleeping = {
        "one": (1 + args.packages) * args.sleep,
        "one -j3": (1 + -(-args.packages // 3)) * args.sleep,
        "shards": (1 + -(-args.packages // 3)) * args.sleep,
    }
    print(f"{args.packages} packages, sleep {args.sleep:g} s, {args.runs} run(s)")
    print("| build | median s | sleeping at best |")
    print("|---|---|---|")
    for way in WAYS:
        print(f"| {way} | {median[way]:.2f} | {sleeping[way]:g} |")
    print(f"one ÷ shards: {median['one'] / median['shards']:.2f}")
    print(f"one -j3 ÷ shards: {median['one -j3'] / median['shards']:.2f}")
    if args.json:
        figures = {"args": vars(args) | {"json": str(args.json)}, "samples": samples}
        figures["ratio_one_over_shards"] = round(median["one"] / median["shards"], 3)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
