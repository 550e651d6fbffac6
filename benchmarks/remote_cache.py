#!/usr/bin/env python3
"""Benchmark: "fresh runner, warm remote cache" against a cold build, on both remote backends.

    python benchmarks/remote_cache.py [--package DIR] [--json FILE] [--backend http|oci]...

For each backend (nginx WebDAV and the OCI registry, started from cache/ on loopback ports):
    cold          runner A: empty cache, no remote                      (the baseline)
    cold+push     runner A': empty cache, --cache-to                    (what pushing costs)
    warm-remote   runner B: empty cache, no rfs layers in the engine, --cache-from
    late-change   runner C: like B, with the last command edited        (resume from a layer)
Each runner's wall time is measured around the `rfs build` process. The package is
examples/busybox by default, with a unique first command so its keys (and layer tags) are this
run's alone; every layer image, cache directory and server is removed at the end. Loopback
servers measure rfs's own overhead, not a network: add the transfer time of the reported bytes
at your network's speed for a real CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from tests.cacheservers import start_nginx, start_registry  # noqa: E402

DOCKER = "/usr/bin/docker"  # Debian's client; another one may shadow it on PATH


def prepare_package(source: Path, work: Path) -> Path:
    """A copy of `source` whose keys are unique to this run (an extra first command)."""
    pkg = work / "pkg"
    shutil.copytree(source, pkg)
    toml = pkg / "build.toml"
    marker = f'[[commands]]\ncommand = "mkdir -p /etc/rfs-bench-{uuid.uuid4().hex[:12]}"\n\n'
    text = toml.read_text()
    first = text.index("[[commands]]")
    toml.write_text(text[:first] + marker + text[first:])
    return pkg


def edit_last_command(pkg: Path) -> None:
    """Append a command: the same effect as editing the last one (one command reruns)."""
    toml = pkg / "build.toml"
    text = toml.read_text()
    last = text.rindex("[[commands]]")
    end = text.find("\n[[", last + 1)
    end = len(text) if end < 0 else end
    extra = '\n[[commands]]\ncommand = "touch /etc/rfs-bench-late"\n'
    toml.write_text(text[:end].rstrip("\n") + "\n" + extra + text[end:])


def build(pkg: Path, out: Path, cache: Path, *extra: str) -> dict[str, Any]:
    """Run one `rfs build`; return its wall time and what it reported."""
    env = {**os.environ, "RFS_CACHE_DIR": str(cache), "RFS_CONFIG": os.devnull}
    env.pop("RFS_CACHE_FROM", None)
    env.pop("RFS_CACHE_TO", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rfs", "build", str(pkg), "-o", str(out), "-q", *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=REPO,
    )
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rfs build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stderr.splitlines()
    ran = [ln.split()[1] for ln in lines if ln.strip().startswith("done ")]
    fetched = [ln.strip() for ln in lines if ln.strip().startswith("fetched ")]
    pushed = [ln.strip() for ln in lines if ln.strip().startswith("pushed ")]
    return {"seconds": round(seconds, 2), "ran": ran, "fetched": fetched, "pushed": pushed}


def drop_layers(*caches: Path) -> None:
    """Remove the layer images these caches made: the next runner has an empty engine."""
    tags = sorted({t for c in caches for t in layer_tags(c)})
    if tags:
        subprocess.run([DOCKER, "rmi", "-f", *tags], capture_output=True, check=False)


def scenario(kind: str, source: Path, work: Path) -> dict[str, Any]:
    """The four runners against one fresh server of `kind`."""
    server = start_nginx() if kind == "http" else start_registry()
    caches: list[Path] = []

    def cache(name: str) -> Path:
        caches.append(work / f"cache-{kind}-{name}")
        return caches[-1]

    try:
        pkg = prepare_package(source, work / kind)
        results: dict[str, Any] = {"backend": kind, "url": server.url}
        results["cold"] = build(pkg, work / "cold.ext4", cache("cold"))
        drop_layers(*caches)
        results["cold+push"] = build(pkg, work / "a.ext4", cache("a"), "--cache-to", server.url)
        drop_layers(*caches)
        results["warm-remote"] = build(pkg, work / "b.ext4", cache("b"), "--cache-from", server.url)
        same = (work / "a.ext4").read_bytes() == (work / "b.ext4").read_bytes()
        results["warm-remote"]["identical_output"] = same
        drop_layers(*caches)
        edit_last_command(pkg)
        results["late-change"] = build(pkg, work / "c.ext4", cache("c"), "--cache-from", server.url)
        results["server_bytes"] = sum(
            p.stat().st_size for p in server.data.rglob("*") if p.is_file()
        )
        return results
    finally:
        drop_layers(*caches)
        server.stop()


def main() -> int:
    """Run the scenarios and print a table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=REPO / "examples" / "busybox")
    parser.add_argument("--backend", action="append", choices=["http", "oci"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rfs-bench-remote-"))
    try:
        runs = [
            scenario(kind, args.package.resolve(), work) for kind in args.backend or ["http", "oci"]
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'backend':<8} {'runner':<12} {'seconds':>8}  steps run / fetched")
    for r in runs:
        for name in ("cold", "cold+push", "warm-remote", "late-change"):
            row = r[name]
            fetched = ", ".join(f.split()[1] for f in row["fetched"]) or "-"
            print(
                f"{r['backend']:<8} {name:<12} {row['seconds']:>8.2f}  "
                f"ran {len(row['ran'])} ({' '.join(row['ran']) or '-'}); fetched {fetched}"
            )
        speedup = r["cold"]["seconds"] / max(r["warm-remote"]["seconds"], 1e-3)
        print(
            f"{r['backend']:<8} warm remote vs cold: {speedup:.1f}x faster; identical output: "
            f"{r['warm-remote']['identical_output']}; server holds "
            f"{r['server_bytes'] / 2**20:.1f} MiB"
        )
        for line in r["cold+push"]["pushed"] + r["warm-remote"]["fetched"]:
            print(f"{'':8} {line}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
