"""Measure rfs against the uncached pipeline, scenario by scenario, in one run.

    python -m benchmarks [--package busybox|debian|all] [--runs 3] [--json FILE]

For each package, each repetition runs the baseline (benchmarks/baseline.py: the buildfs
pipeline, no cache) once and every rfs scenario once, interleaved, so the ratios compare
figures taken side by side on the same (noisy, shared) machine:

    cold      empty cache directory
    noop      nothing changed since the last build
    overlay   one overlay file changed
    late      the last command changed
    early     the first command changed
    base      the base image changed (a new image with one more file)

Each figure is the wall time of the whole `rfs build` process, its peak memory, and the
allocated bytes of the image it wrote. Root is needed (the baseline loop-mounts). rfs is
byte-compiled first, as an installed package is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import edits

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"busybox": ROOT / "examples" / "busybox", "debian": ROOT / "examples" / "debian"}
SCENARIOS = ("cold", "noop", "overlay", "late", "early", "base")
_DONE = re.compile(r"^\s*done\s+(\S+)\s+([\d.]+) s")


@dataclass
class Sample:
    """One timed process."""

    wall: float
    max_rss_kib: int
    allocated: int | None = None
    steps: dict[str, float] = field(default_factory=dict)  # step id -> seconds, from rfs
    containers: int | None = None


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[Sample, str]:
    """Run argv, return its wall time and peak memory (its own, via wait4) and stderr."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-3000:]}")
    return Sample(wall, usage.ru_maxrss), text


def allocated(path: Path) -> int:
    """Bytes the file really occupies on disk."""
    return path.stat().st_blocks * 512


class Bench:
    """The state of one package's benchmark: a working copy, a cache dir, an output."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.work = work
        self.pkg = work / "pkg"
        shutil.copytree(PACKAGES[name], self.pkg)
        self.cache = work / "cache"
        self.out = work / "out.img"
        self.base_tags: list[str] = []

    def rfs(self) -> Sample:
        run_id = uuid.uuid4().hex
        env = {**os.environ, "RFS_CACHE_DIR": str(self.cache), "RFS_RUN_ID": run_id}
        since = time.time()
        sample, err = timed(
            [sys.executable, "-m", "rfs", "build", str(self.pkg), "-o", str(self.out), "-q"], env
        )
        for line in err.splitlines():
            m = _DONE.match(line)
            if m:
                sample.steps[m.group(1)] = float(m.group(2))
        sample.allocated = allocated(self.out)
        sample.containers = count_containers(run_id, since)
        return sample

    def scenario(self, name: str, token: str) -> Sample:
        """Bring the cache to the scenario's starting state, apply its edit, time the build."""
        if name == "cold":
            shutil.rmtree(self.cache, ignore_errors=True)
            return self.rfs()
        self.rfs()  # warm: the previous state is built
        if name == "overlay":
            edits.edit_overlay(self.pkg, token)
        elif name == "late":
            edits.edit_command(self.pkg, -1, token)
        elif name == "early":
            edits.edit_command(self.pkg, 0, token)
        elif name == "base":
            self.base_tags.append(edits.new_base(self.pkg, token))
        return self.rfs()

    def baseline(self) -> Sample:
        out = self.work / "baseline.img"
        sample, _ = timed(
            [sys.executable, "-m", "benchmarks.baseline", str(PACKAGES[self.name]), str(out)]
        )
        sample.allocated = allocated(out)
        out.unlink()
        return sample

    def bare_assembly(self) -> tuple[Sample, int]:
        """mke2fs from the already-extracted tree of the current export, and its content bytes."""
        # The newest export tarball (the cache also holds ext4 base images).
        exports = sorted(
            (p for p in (self.cache / "blobs").iterdir() if _is_tar(p)),
            key=lambda p: p.stat().st_mtime,
        )
        tree = self.work / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        subprocess.run(
            [
                "tar",
                "-C",
                str(tree),
                "-xpf",
                str(exports[-1]),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
            ],
            check=True,
        )
        content = int(
            subprocess.run(
                ["du", "-sb", "--apparent-size", str(tree)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[0]
        )
        img = self.work / "bare.img"
        img.unlink(missing_ok=True)
        size = _size_mib(self.pkg)
        sample, _ = timed(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(img), f"{size}M"])
        img.unlink()
        shutil.rmtree(tree)
        return sample, content

    def cleanup(self) -> None:
        for tag in self.base_tags:
            subprocess.run([edits.DOCKER, "rmi", "-f", tag], capture_output=True, check=False)


def _is_tar(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def _size_mib(pkg: Path) -> int:
    import tomllib

    return int(tomllib.loads((pkg / "build.toml").read_text())["filesystem"]["size_mib"])


def count_containers(run_id: str, since: float) -> int:
    """Containers the engine created for one rfs run (by its run label)."""
    out = subprocess.run(
        [
            edits.DOCKER,
            "events",
            "--since",
            f"{since - 1:.3f}",
            "--until",
            f"{time.time():.3f}",
            "--filter",
            "type=container",
            "--filter",
            "event=create",
            "--filter",
            f"label=org.rfs.run={run_id}",
            "--format",
            "{{.ID}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(out.stdout.split())


@dataclass
class PackageResult:
    """Every sample of one package."""

    samples: dict[str, list[Sample]]
    bare_assembly: list[Sample]
    content_bytes: int

    def median(self, scenario: str) -> float:
        return statistics.median(s.wall for s in self.samples[scenario])

    def as_json(self) -> dict[str, object]:
        return {
            "samples": {k: [asdict(s) for s in v] for k, v in self.samples.items()},
            "bare_assembly": [asdict(s) for s in self.bare_assembly],
            "content_bytes": self.content_bytes,
            "targets": [{"target": t, "met": m, "measured": f} for t, m, f in targets(self)],
        }


def run_package(name: str, runs: int) -> PackageResult:
    work = Path(tempfile.mkdtemp(prefix=f"rfs-bench-{name}-"))
    bench = Bench(name, work)
    results: dict[str, list[Sample]] = {s: [] for s in ("baseline", *SCENARIOS)}
    bare: list[Sample] = []
    content = 0
    try:
        for r in range(runs):
            print(f"[{name}] run {r + 1}/{runs}: baseline", file=sys.stderr, flush=True)
            results["baseline"].append(bench.baseline())
            for scenario in SCENARIOS:
                print(f"[{name}] run {r + 1}/{runs}: {scenario}", file=sys.stderr, flush=True)
                results[scenario].append(bench.scenario(scenario, uuid.uuid4().hex[:12]))
            sample, content = bench.bare_assembly()
            bare.append(sample)
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return PackageResult(results, bare, content)


def _late_ratio(s: Sample) -> float:
    """Wall time over the time of the steps that had to run (the command, export, assembly)."""
    work = sum(v for k, v in s.steps.items() if k.startswith("run[") or k in ("export", "assemble"))
    return s.wall / work if work else float("inf")


def targets(r: PackageResult) -> list[tuple[str, bool, str]]:
    """Each target of the benchmark issue: met or missed, with the measured figure."""
    base, noop, overlay, cold = (r.median(s) for s in ("baseline", "noop", "overlay", "cold"))
    bare = statistics.median(s.wall for s in r.bare_assembly)
    late = statistics.median(_late_ratio(s) for s in r.samples["late"])
    alloc = statistics.median(s.allocated or 0 for s in r.samples["cold"])
    alloc_ratio = alloc / max(r.content_bytes, 1)
    started = max(s.containers or 0 for s in r.samples["overlay"])
    return [
        ("no-op ≥ 50x faster than baseline", base / noop >= 50, f"{base / noop:.1f}x"),
        ("no-op < 0.3 s", noop < 0.3, f"{noop:.3f} s"),
        ("overlay edit starts no container", started == 0, f"{started} container(s)"),
        (
            "overlay edit ≤ 1.5x bare assembly",
            overlay / bare <= 1.5,
            f"{overlay / bare:.2f}x ({overlay:.2f} s vs {bare:.2f} s)",
        ),
        ("late edit ≤ 1.2x (command + export + assembly)", late <= 1.2, f"{late:.2f}x"),
        ("cold ≤ 1.15x baseline", cold / base <= 1.15, f"{cold / base:.2f}x"),
        (
            "image allocates ≤ 1.1x its content",
            alloc_ratio <= 1.1,
            f"{alloc_ratio:.2f}x ({alloc / 2**20:.0f} MiB for {r.content_bytes / 2**20:.0f} MiB)",
        ),
    ]


def table(name: str, r: PackageResult) -> str:
    """The results of one package as a Markdown table, then the targets."""
    base = r.median("baseline")
    lines = [
        f"## {name}",
        "",
        "| scenario | min s | median s | baseline ÷ median | peak RSS MiB "
        "| image MiB allocated | containers |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in ("baseline", *SCENARIOS):
        runs = r.samples[scenario]
        med = r.median(scenario)
        rss = max(s.max_rss_kib for s in runs) / 1024
        alloc = statistics.median(s.allocated or 0 for s in runs) / 2**20
        made = "" if runs[0].containers is None else str(max(s.containers or 0 for s in runs))
        lines.append(
            f"| {scenario} | {min(s.wall for s in runs):.2f} | {med:.2f} | "
            f"{base / med:.1f}x | {rss:.0f} | {alloc:.1f} | {made} |"
        )
    lines += ["", "| target | result | measured |", "|---|---|---|"]
    for text, met, figure in targets(r):
        lines.append(f"| {text} | {'met' if met else 'MISSED'} | {figure} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--package", choices=[*PACKAGES, "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the baseline loop-mounts its image")
    from rfs import __version__

    # As `pip install` does: without it, a process started with PYTHONDONTWRITEBYTECODE set (as
    # on these machines) compiles every rfs module again, which the no-op would pay each run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "rfs")], check=True)
    names = list(PACKAGES) if args.package == "all" else [args.package]
    packages: dict[str, object] = {}
    report: dict[str, object] = {
        "rfs_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "mke2fs": subprocess.run(
                ["mke2fs", "-V"], capture_output=True, text=True
            ).stderr.splitlines()[0],
            "docker": subprocess.run(
                [edits.DOCKER, "version", "-f", "{{.Server.Version}}"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
        },
        "runs": args.runs,
        "packages": packages,
    }
    for name in names:
        result = run_package(name, args.runs)
        packages[name] = result.as_json()
        print(table(name, result) + "\n", flush=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
