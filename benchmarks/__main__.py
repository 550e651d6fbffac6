"""Measure rfs against the uncached pipeline, scenario by scenario, in one run.

    python -m benchmarks [--suite classic|edits] [--package NAME|all] [--runs 3] [--json FILE]

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

`--suite edits` measures issue #16 ("edits cost what changed, not what the image weighs") on
packages made from the examples, each with one trailing command (`touch /etc/rfs-late`):

    debian    buildfs's README example (examples/debian) + the late command
    big       examples/busybox whose first command writes 1.5 GiB of random data + the late command
    busybox   examples/busybox + the late command

with the scenarios cold, noop, late (the last command `touch`es a new name) and overlay, and two
baselines timed in the same run: the uncached pipeline and BuildKit + `mkfs.ext4 -d`
(benchmarks/buildkit.py). A late-command edit also records how many bytes the rfs cache
directory (allocated blocks) and the engine (the committed layers' own size) grew by.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import edits

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"busybox": ROOT / "examples" / "busybox", "debian": ROOT / "examples" / "debian"}
SCENARIOS = ("cold", "noop", "overlay", "late", "early", "base")
MIB = 2**20


def _big(pkg: Path) -> None:
    edits.make_big(pkg)
    edits.add_late_command(pkg)


# The edits suite (#16): name -> (example copied, how the copy is made into the package)
EDIT_PACKAGES: dict[str, tuple[Path, Callable[[Path], None]]] = {
    "debian": (PACKAGES["debian"], edits.add_late_command),
    "big": (PACKAGES["busybox"], _big),
    "busybox": (PACKAGES["busybox"], edits.add_late_command),
}
EDIT_DEFAULT = ("debian", "big")  # `--package all` in the edits suite
EDIT_SCENARIOS = ("cold", "noop", "late", "overlay")
# #16's targets per package: (late-command edit s, overlay edit s); busybox borrows debian's
EDIT_TARGETS = {"debian": (2.0, 0.5), "big": (2.5, 0.6), "busybox": (2.0, 0.5)}
CACHE_GROWTH_ALLOWANCE = 64 * MIB  # plus what the command changed (a `touch`: nothing)
_DONE = re.compile(r"^\s*done\s+(\S+)\s+([\d.]+) s")


@dataclass
class Sample:
    """One timed process."""

    wall: float
    max_rss_kib: int
    allocated: int | None = None
    steps: dict[str, float] = field(default_factory=dict)  # step id -> seconds, from rfs
    containers: int | None = None
    cache_growth: int | None = None  # allocated bytes the cache directory grew by
    engine_growth: int | None = None  # bytes of the layers the build committed (their own size)


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


def tree_allocated(root: Path) -> int:
    """Bytes every file under `root` really occupies (as `du -sB1`: hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


# Every process the harness starts runs this checkout's rfs and benchmarks.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Bench:
    """The state of one package's benchmark: a working copy, a cache dir, an output.

    `pristine` is the package as built from scratch (the baselines build it); `pkg` is the copy
    the scenarios edit."""

    def __init__(
        self,
        name: str,
        work: Path,
        source: Path,
        prepare: Callable[[Path], None] | None = None,
        suite: str = "classic",
    ) -> None:
        self.name = name
        self.work = work
        self.suite = suite
        self.pristine = work / "pristine"
        shutil.copytree(source, self.pristine)
        if prepare is not None:
            prepare(self.pristine)
        self.pkg = work / "pkg"
        shutil.copytree(self.pristine, self.pkg)
        self.cache = work / "cache"
        self.out = work / "out.img"
        self.base_tags: list[str] = []

    def rfs(self) -> Sample:
        run_id = uuid.uuid4().hex
        env = {**ENV, "RFS_CACHE_DIR": str(self.cache), "RFS_RUN_ID": run_id}
        before = tree_allocated(self.cache) if self.cache.exists() else 0
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
        sample.cache_growth = tree_allocated(self.cache) - before
        sample.engine_growth = committed_bytes(run_id, since)
        return sample

    def clear_cache(self) -> None:
        """Empty the cache directory, and remove its layer images from the engine."""
        if self.cache.exists():
            subprocess.run(
                [sys.executable, "-m", "rfs", "cache", "clear"],
                env={**ENV, "RFS_CACHE_DIR": str(self.cache)},
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.cache, ignore_errors=True)

    def scenario(self, name: str, token: str) -> Sample:
        """Bring the cache to the scenario's starting state, apply its edit, time the build."""
        if name == "cold":
            self.clear_cache()
            return self.rfs()
        self.rfs()  # warm: the previous state is built
        if name == "overlay":
            edits.edit_overlay(self.pkg, token)
        elif name == "late" and self.suite == "edits":
            edits.edit_late_touch(self.pkg, token)
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
            [sys.executable, "-m", "benchmarks.baseline", str(self.pristine), str(out)], ENV
        )
        sample.allocated = allocated(out)
        out.unlink()
        return sample

    def buildkit(self) -> Sample:
        """BuildKit (no cache) + `mkfs.ext4 -d`, at the size rfs gives the image."""
        out = self.work / "buildkit.img"
        size = _size_mib(self.pristine)
        sample, _ = timed(
            [
                sys.executable,
                "-m",
                "benchmarks.buildkit",
                str(self.pristine),
                str(out),
                str(size),
            ],
            ENV,
        )
        sample.allocated = allocated(out)
        out.unlink()
        # The build cache BuildKit kept (its --no-cache runs still record their results).
        subprocess.run([edits.DOCKER, "builder", "prune", "-af"], capture_output=True, check=False)
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
        self.clear_cache()
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


def committed_bytes(run_id: str, since: float) -> int:
    """The engine's growth from one rfs run: the own size (image size minus its parent's) of
    each image committed from a container carrying the run's label."""
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
            "event=commit",
            "--filter",
            f"label=org.rfs.run={run_id}",
            "--format",
            "{{.Actor.Attributes.imageID}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    total = 0
    for image in out.stdout.split():
        size, parent = _image_size(image)
        total += size - (_image_size(parent)[0] if parent else 0)
    return total


def _image_size(image: str) -> tuple[int, str]:
    out = subprocess.run(
        [edits.DOCKER, "image", "inspect", "-f", "{{.Size}} {{.Parent}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:  # gone already (evicted): its size is not known
        return 0, ""
    size, _, parent = out.stdout.strip().partition(" ")
    return int(size), parent


@dataclass
class PackageResult:
    """Every sample of one package."""

    samples: dict[str, list[Sample]]
    bare_assembly: list[Sample]
    content_bytes: int
    name: str = ""
    suite: str = "classic"

    def median(self, scenario: str) -> float:
        return statistics.median(s.wall for s in self.samples[scenario])

    def as_json(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "samples": {k: [asdict(s) for s in v] for k, v in self.samples.items()},
            "bare_assembly": [asdict(s) for s in self.bare_assembly],
            "content_bytes": self.content_bytes,
            "targets": [{"target": t, "met": m, "measured": f} for t, m, f in targets(self)],
        }


def run_package(name: str, runs: int) -> PackageResult:
    work = Path(tempfile.mkdtemp(prefix=f"rfs-bench-{name}-"))
    bench = Bench(name, work, PACKAGES[name])
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
    return PackageResult(results, bare, content, name)


def run_edits_package(name: str, runs: int) -> PackageResult:
    """The edits suite (#16) for one package: both baselines and each scenario, per run."""
    source, prepare = EDIT_PACKAGES[name]
    work = Path(tempfile.mkdtemp(prefix=f"rfs-bench-{name}-", dir=_work_parent()))
    bench = Bench(name, work, source, prepare, suite="edits")
    results: dict[str, list[Sample]] = {s: [] for s in ("baseline", "buildkit", *EDIT_SCENARIOS)}
    try:
        for r in range(runs):
            for which, measure in (("baseline", bench.baseline), ("buildkit", bench.buildkit)):
                print(f"[{name}] run {r + 1}/{runs}: {which}", file=sys.stderr, flush=True)
                results[which].append(measure())
            for scenario in EDIT_SCENARIOS:
                print(f"[{name}] run {r + 1}/{runs}: {scenario}", file=sys.stderr, flush=True)
                results[scenario].append(bench.scenario(scenario, uuid.uuid4().hex[:12]))
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return PackageResult(results, [], 0, name, "edits")


def _work_parent() -> str | None:
    """Where the working directories go: $RFS_BENCH_DIR, else the default temporary directory
    (the big package needs about 10 GiB there: cache, images, the baselines' trees)."""
    return os.environ.get("RFS_BENCH_DIR") or None


def _late_ratio(s: Sample) -> float:
    """Wall time over the time of the steps that had to run (the command, export, assembly)."""
    work = sum(
        v
        for k, v in s.steps.items()
        if k.startswith(("run[", "diff[")) or k in ("export", "assemble")
    )
    return s.wall / work if work else float("inf")


def edit_targets(r: PackageResult) -> list[tuple[str, bool, str]]:
    """Each target of #16 for one package: met or missed, with the measured figure."""
    late_max, overlay_max = EDIT_TARGETS[r.name]
    base, bk, cold, noop, late, overlay = (
        r.median(s) for s in ("baseline", "buildkit", "cold", "noop", "late", "overlay")
    )
    cache = statistics.median(s.cache_growth or 0 for s in r.samples["late"])
    engine = statistics.median(s.engine_growth or 0 for s in r.samples["late"])
    grown = statistics.median(
        (s.cache_growth or 0) + (s.engine_growth or 0) for s in r.samples["late"]
    )
    return [
        (f"late-command edit ≤ {late_max} s", late <= late_max, f"{late:.2f} s"),
        (f"overlay edit ≤ {overlay_max} s", overlay <= overlay_max, f"{overlay:.2f} s"),
        (
            "storage per late-command edit ≤ 64 MiB + what the command changed (a `touch`)",
            grown <= CACHE_GROWTH_ALLOWANCE,
            f"{grown / MIB:.1f} MiB (cache directory {cache / MIB:.1f} MiB "
            f"+ engine layers {engine / MIB:.1f} MiB)",
        ),
        (
            "cold ≤ 1.0x the uncached pipeline",
            cold <= base,
            f"{cold / base:.2f}x ({cold:.1f} s vs {base:.1f} s)",
        ),
        (
            "cold ≤ 1.0x BuildKit + `mkfs.ext4 -d`",
            cold <= bk,
            f"{cold / bk:.2f}x ({cold:.1f} s vs {bk:.1f} s)",
        ),
        ("no-op < 0.3 s", noop < 0.3, f"{noop:.3f} s"),
    ]


def targets(r: PackageResult) -> list[tuple[str, bool, str]]:
    """Each target of the benchmark issue: met or missed, with the measured figure."""
    if r.suite == "edits":
        return edit_targets(r)
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
    edits_suite = r.suite == "edits"
    growth = " cache +MiB | engine +MiB |" if edits_suite else ""
    lines = [
        f"## {name}",
        "",
        "| scenario | min s | median s | baseline ÷ median | peak RSS MiB "
        f"| image MiB allocated | containers |{growth}",
        "|---|---|---|---|---|---|---|" + ("---|---|" if edits_suite else ""),
    ]
    for scenario in r.samples:
        runs = r.samples[scenario]
        med = r.median(scenario)
        rss = max(s.max_rss_kib for s in runs) / 1024
        alloc = statistics.median(s.allocated or 0 for s in runs) / 2**20
        made = "" if runs[0].containers is None else str(max(s.containers or 0 for s in runs))
        row = (
            f"| {scenario} | {min(s.wall for s in runs):.2f} | {med:.2f} | "
            f"{base / med:.1f}x | {rss:.0f} | {alloc:.1f} | {made} |"
        )
        if edits_suite:
            for attr in ("cache_growth", "engine_growth"):
                grown = statistics.median(getattr(s, attr) or 0 for s in runs)
                row += f" {grown / MIB:.1f} |" if scenario not in ("baseline", "buildkit") else " |"
        lines.append(row)
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
    parser.add_argument(
        "--suite",
        choices=("classic", "edits"),
        default="classic",
        help="classic: the examples, six scenarios, the uncached pipeline; edits: issue #16",
    )
    parser.add_argument(
        "--package",
        choices=sorted({*PACKAGES, *EDIT_PACKAGES, "all"}),
        default="all",
        help="classic: busybox, debian; edits: debian, big, busybox (all: debian and big)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="default benchmarks/results.json (classic), benchmarks/results-edits.json (edits)",
    )
    args = parser.parse_args()
    if args.json is None:
        name = "results.json" if args.suite == "classic" else "results-edits.json"
        args.json = ROOT / "benchmarks" / name
    known = PACKAGES if args.suite == "classic" else EDIT_PACKAGES
    if args.package != "all" and args.package not in known:
        parser.error(f"the {args.suite} suite has no package {args.package}")
    if os.geteuid() != 0:
        parser.error("run as root: the baseline loop-mounts its image")
    from rfs import __version__

    # As `pip install` does: without it, a process started with PYTHONDONTWRITEBYTECODE set (as
    # on these machines) compiles every rfs module again, which the no-op would pay each run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "rfs")], check=True)
    default = list(PACKAGES) if args.suite == "classic" else list(EDIT_DEFAULT)
    names = default if args.package == "all" else [args.package]
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
        "suite": args.suite,
        "packages": packages,
    }
    for name in names:
        if args.suite == "edits":
            result = run_edits_package(name, args.runs)
        else:
            result = run_package(name, args.runs)
        packages[name] = result.as_json()
        print(table(name, result) + "\n", flush=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
