"""Several packages as one graph (`rfs build PKG... --output-dir DIR`) on the fake engine: shared
steps run once, images equal single-package builds, `-j` overlaps steps, a failure in one
package names it and leaves the others' finished steps cached. The real engine's proof is
tests/integration/test_many_images.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rfs.commands import package_names
from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import EXIT_STEP_FAILED, RfsError, UsageError
from rfs.graph.planner import Action
from rfs.graph.steps import Step
from rfs.host import signals
from rfs.pipeline.build import Job, Options, execute, execute_all, prepare
from rfs.report.packages import PackageReporter
from rfs.report.reporter import Reporter
from rfs.run.store import Store
from tests.fakeshell import shell_of


def script(*commands: str) -> str:
    lines = ['[filesystem]\nsize_mib = 8\n[container]\nimage = { name = "fake/base", tag = "1" }']
    lines += [f'[[commands]]\ncommand = "{c}"' for c in commands]
    return "\n".join(lines) + "\n"


shell = shell_of(newline=False, strict=False)


SHARED = ("write /etc/one 1", "write /etc/two 2")


class Family:
    """Packages in `root/<name>/build.toml`, one cache, one fake engine."""

    def __init__(self, root: Path, run: Callable[[FakeRun], int] = shell) -> None:
        self.root = root
        self.engine = FakeEngine(run)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
        self.out = root / "out"
        self.out.mkdir(parents=True)

    def package(self, name: str, *commands: str) -> Path:
        (self.root / name).mkdir(exist_ok=True)
        (self.root / name / "build.toml").write_text(script(*commands))
        return self.root / name

    def single(self, package: Path, output: Path) -> None:
        """Build `package` alone, as `rfs build PKG -o OUTPUT` does."""
        with signals.handled():
            planned = prepare(
                Options(package, output=output, cache_dir=self.root / "cache"),
                Reporter(),
                lambda s: self.engine,
            )
            try:
                execute(planned, Reporter())
            finally:
                planned.store.close()

    def build(
        self,
        packages: list[Path],
        jobs: int = 1,
        cache: str = "cache",
        reporter: Reporter | None = None,
        keep_failed: bool = False,
    ) -> dict[str, dict[str, Action]]:
        """Build `packages` together; return what happened to each one's steps."""
        names = package_names(packages)
        store = Store(self.root / cache)
        reporter = reporter or Reporter()
        done: list[Job] = []
        try:
            with signals.handled():
                for package, name in zip(packages, names, strict=True):
                    opts = Options(package, cache_dir=self.root / cache, output_dir=self.out)
                    opts.keep_failed, opts.run_id = keep_failed, "one-run"
                    shown = PackageReporter(reporter, name)
                    planned = prepare(opts, shown, lambda s: self.engine, store=store)
                    done.append(Job(planned, shown, name))
                execute_all(done, jobs)
        finally:
            store.close()
        return {job.name: {d.step.id: d.action for d in job.planned.decisions} for job in done}


def test_shared_steps_run_once_and_images_equal_single_builds(tmp_path: Path) -> None:
    fam = Family(tmp_path)
    a = fam.package("a", *SHARED, "write /etc/name a")
    b = fam.package("b", *SHARED, "write /etc/name b")
    fam.build([a, b], jobs=2)
    # run[0] and run[1] once for both, run[2] once each.
    assert fam.engine.calls.count("run") == 4
    for name in ("a", "b"):
        alone = Family(tmp_path / f"alone-{name}")
        image = alone.out / "image.ext4"
        alone.single(alone.package(name, *SHARED, f"write /etc/name {name}"), image)
        assert image.read_bytes() == (fam.out / f"{name}.ext4").read_bytes()
    assert (fam.out / "a.ext4").read_bytes() != (fam.out / "b.ext4").read_bytes()
    again = fam.build([a, b], jobs=2)  # nothing left to do
    assert all(Action.RUN not in steps.values() for steps in again.values())
    assert fam.engine.calls.count("run") == 4


def test_jobs_overlap_the_packages_steps(tmp_path: Path) -> None:
    # The first commands of two packages each wait for the other: they must run at once.
    barrier = threading.Barrier(2, timeout=30)

    def run(ctx: FakeRun) -> int:
        if ctx.argv[0] == "meet":
            barrier.wait()
        return shell(ctx)

    fam = Family(tmp_path, run)
    a = fam.package("a", "meet a", "write /etc/a a")
    b = fam.package("b", "meet b", "write /etc/b b")
    fam.build([a, b], jobs=2)
    assert fam.engine.calls.count("run") == 4


def test_one_job_runs_one_step_at_a_time(tmp_path: Path) -> None:
    lock = threading.Lock()

    def run(ctx: FakeRun) -> int:
        assert lock.acquire(blocking=False), "two commands ran at once"
        try:
            return shell(ctx)
        finally:
            lock.release()

    fam = Family(tmp_path, run)
    fam.build([fam.package("a", "write /a a"), fam.package("b", "write /b b")], jobs=1)
    assert fam.engine.calls.count("run") == 2


def test_a_failure_names_its_package_and_the_rest_stays_cached(tmp_path: Path) -> None:
    fam = Family(tmp_path)
    a = fam.package("a", *SHARED, "write /etc/name a")
    b = fam.package("b", *SHARED, "fail")
    with pytest.raises(RfsError) as failed:
        fam.build([a, b], jobs=2)
    assert "package b" in failed.value.message and "run[2]" in failed.value.message
    assert failed.value.exit_code == EXIT_STEP_FAILED
    fam.package("b", *SHARED, "write /etc/name b")  # fixed
    again = fam.build([a, b], jobs=2)
    assert again["b"]["run[1]"] is Action.CACHED  # made before the failure, kept
    assert again["b"]["run[2]"] is Action.RUN


def test_two_packages_of_one_name_are_refused(tmp_path: Path) -> None:
    fam = Family(tmp_path)
    one = fam.package("web", "write /a a")
    (tmp_path / "other").mkdir()
    two = tmp_path / "other" / "web.toml"
    two.write_text(script("write /b b"))
    assert package_names([one, fam.package("db", "x")]) == ["web", "db"]
    with pytest.raises(UsageError, match="both named 'web'"):
        package_names([one, two])


def test_package_reporter_names_steps_by_package(tmp_path: Path) -> None:
    fam = Family(tmp_path)
    inner = Reporter()
    store = Store(tmp_path / "cache")
    try:
        opts = Options(fam.package("web", "write /a a"), cache_dir=tmp_path / "cache")
        opts.output_dir = fam.out
        planned = prepare(opts, inner, lambda s: fam.engine, store=store)
    finally:
        store.close()
    shown = PackageReporter(inner, "web")
    shown.planned(planned.decisions)
    run0 = next(s for s in planned.steps if s.id == "run[0]")
    shown.finished(run0, 1.0)
    assert "web/run[0]" in inner.results and inner.results["web/run[0]"].status == "ran"
    assert inner.results["web/run[0]"].step.parents == ("web/base",)
    assert planned.executor.output == fam.out / "web.ext4"


class Order(Reporter):
    """Remembers the order steps started, finished and were reused in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        self.seen.append(f"reused {step.id}")

    def started(self, step: Step, reason: str) -> None:
        self.seen.append(f"started {step.id}")

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        self.seen.append(f"finished {step.id}")


def test_a_step_one_package_forces_is_waited_for_by_the_others(tmp_path: Path) -> None:
    """`no_cache` is not in the key: package a makes run[0] again while b, planning to reuse
    the same key, must not build on it before it is made again."""
    fam = Family(tmp_path)
    a = fam.package("a", "write /one 1", "write /a a")
    b = fam.package("b", "write /one 1", "write /b b")
    fam.build([a, b], jobs=2)
    (a / "build.toml").write_text(
        script("write /one 1", "write /a a").replace(
            'command = "write /one 1"', 'command = "write /one 1"\nno_cache = true'
        )
    )
    fam.package("b", "write /one 1", "write /b bb")
    order = Order()
    fam.build([a, b], jobs=2, reporter=order)
    assert order.seen.index("finished a/run[0]") < order.seen.index("reused b/run[0]")
    assert order.seen.index("reused b/run[0]") < order.seen.index("started b/run[1]")


def test_every_package_keeps_its_failed_container(tmp_path: Path) -> None:
    """The packages of a build share its run label: the clean-up of one must not remove the
    container another keeps for `--keep-failed`."""
    barrier = threading.Barrier(2, timeout=30)

    def run(ctx: FakeRun) -> int:
        if ctx.argv[0] == "fail":
            barrier.wait()  # both fail, at once
        return shell(ctx)

    fam = Family(tmp_path, run)
    with pytest.raises(RfsError) as failed:
        fam.build(
            [fam.package("a", "fail a"), fam.package("b", "fail b")], jobs=2, keep_failed=True
        )
    assert "package a:" in failed.value.message and "package b:" in failed.value.message
    assert len(fam.engine.kept) == 2
