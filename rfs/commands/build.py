"""`rfs build` (alias `run`): build the image, rerunning only what changed; several packages
as one graph with `--output-dir` (docs/many-images.md)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.commands import add_cache_options, add_force_options, build_options
from rfs.errors import EXIT_OK, RfsError, UsageError

if TYPE_CHECKING:
    from rfs.pipeline.shard import Shard


def register(sub: Any) -> None:
    """Add the `build` parser."""
    p = sub.add_parser("build", aliases=["run"], help="build the image")
    p.add_argument(
        "package",
        type=Path,
        nargs="+",
        help="build scripts (.toml/.yaml) or directories with build.toml; several are built "
        "as one graph (docs/many-images.md)",
    )
    add_cache_options(p)
    p.add_argument("-o", "--output", type=Path, help="image file to write (one package)")
    p.add_argument(
        "--output-dir",
        type=Path,
        help="write each package's image to DIR/<name>.<type> (<name>: the package "
        "directory's name or the script file's stem)",
    )
    p.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="run up to N independent steps at once (default: the number of cores this "
        "process may use; -j 1: one step at a time, in the plan's order)",
    )
    add_force_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON-lines events on stdout (docs/events.md); the human display goes to stderr",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="build, then build again whenever a file of the package changes (Ctrl-C ends)",
    )
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep the container of a failed command and print how to enter it",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the image with its type's checker (e2fsck -fn, btrfs check, "
        "xfs_repair -n, fsck.vfat -n, unsquashfs, fsck.erofs) after the build",
    )
    from rfs.remote.config import add_remote_options

    add_remote_options(p)
    from rfs.pipeline.shard import parse_shard, parse_wait

    g = p.add_argument_group("shards (docs/shards.md)")
    g.add_argument(
        "--shard",
        type=parse_shard,
        metavar="I/N",
        help="runner I of N building the same packages through the shared cache of "
        "--cache-to: run the steps this shard owns, take the others' from the cache",
    )
    g.add_argument(
        "--shard-wait",
        type=parse_wait,
        metavar="SECONDS",
        help="with --shard: how long to wait for another shard's step before building it here "
        "(default: twice its last known duration plus 30 s)",
    )
    p.set_defaults(func=run)


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r} (try 1, 2, 8)")
    return int(text)


def jobs_of(args: argparse.Namespace) -> int:
    """How many steps may run at once: -j N, else the number of cores this process may use,
    for one package as for several (a package's overlays run beside its commands)."""
    from rfs.pipeline.scheduler import default_jobs

    jobs: int | None = getattr(args, "jobs", None)
    return jobs if jobs is not None else default_jobs()


def run(args: argparse.Namespace) -> int:
    """Build the image (again on every change of the package, with --watch)."""

    packages: list[Path] = args.package
    args.shard_of = shard_of(args)
    if args.output is not None and args.output_dir is not None:
        raise UsageError("give either -o/--output FILE or --output-dir DIR, not both")
    if len(packages) > 1 or args.output is None:
        if args.output_dir is None:
            what = "several packages" if len(packages) > 1 else "the image"
            raise UsageError(f"where should {what} go? give --output-dir DIR (or -o FILE)")
        if args.watch:
            raise UsageError("--watch builds one package; give it one package and -o FILE")
        return build_many(args)
    args.package = packages[0]
    if args.watch:
        from rfs.commands.watch import watch

        return watch(args.package, lambda: build_once(args), ignore=[args.output], out=sys.stderr)
    return build_once(args)


def shard_of(args: argparse.Namespace) -> Shard | None:
    """The --shard of this build, checked: it needs a shared cache to write to."""
    shard: tuple[int, int] | None = getattr(args, "shard", None)
    wait: float | None = getattr(args, "shard_wait", None)
    if shard is None:
        if wait is not None:
            raise UsageError("--shard-wait is for sharded builds: give --shard I/N too")
        return None
    from rfs.pipeline.shard import Shard
    from rfs.remote.config import remote_settings

    if not remote_settings(args).target:
        raise UsageError(
            f"--shard {shard[0]}/{shard[1]}: the shards meet in a shared cache; give "
            "--cache-to URL (or RFS_CACHE_TO), the same for every shard"
        )
    return Shard(shard[0], shard[1], wait)


def build_once(args: argparse.Namespace) -> int:
    """Build the image once, reporting to the terminal, the log or JSON as asked."""
    from rfs.errors import StepFailed
    from rfs.pipeline.build import execute, prepare, release_snapshots
    from rfs.report.display import make_reporter
    from rfs.report.reporter import Reporter, Tee

    opts = build_options(args, args.output, keep_failed=args.keep_failed)
    from rfs.remote.config import remote_settings

    opts.remote = remote_settings(args)
    reporter: Reporter = make_reporter(sys.stderr, quiet=args.quiet)
    if args.json:
        from rfs.report.events import JsonReporter

        # Machines get every event on stdout; the person watching keeps the display on stderr.
        reporter = Tee(
            JsonReporter(sys.stdout, quiet=args.quiet, output=str(opts.output)), reporter
        )
    error: BaseException | None = None
    try:
        planned = prepare(opts, reporter)
        for warning in planned.loaded.warnings:
            reporter.message(f"rfs: warning: {warning}")
        try:
            execute(planned, reporter, jobs_of(args), args.shard_of)
            if args.verify:
                verify_image(planned.script.filesystem.type, planned.executor.output, reporter)
        finally:
            release_snapshots([planned])
            planned.store.close()
    except StepFailed as exc:
        error = exc
        if exc.container:
            reporter.message(enter_hint(exc.container, exc.step, planned.facts.engine))
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        reporter.close(error)
    if not args.json:
        print(str(opts.output))
    return EXIT_OK


def verify_image(fs_type: Any, image: Path, reporter: Any) -> None:
    """Run the image type's checker on the built (or cached) image; raise if it complains."""
    from rfs.fs.assemble import verify

    verify(fs_type, image)
    reporter.message(f"rfs: {image}: {fs_type.value} checker found no problem")


def enter_hint(container: str, step: str, engine: str) -> str:
    """How to get a shell in the kept container of failed step `step`.

    A stopped container cannot be exec'ed into, and `start -ai` would rerun the failed command
    with bind mounts rfs has already removed; so: commit it, and run a shell from the commit
    with the entrypoint replaced, which works for images without a default command.
    """
    cli = "podman" if engine == "podman" else "docker"
    short = container[:12]
    image = f"rfs/failed:{short}"
    return "\n".join(
        [
            f"rfs: kept the container of {step}: {short}",
            f"rfs:   see what it changed:  {cli} diff {short}",
            f"rfs:   get a shell in it:    {cli} commit {short} {image} && "
            f"{cli} run --rm -it --entrypoint /bin/sh {image}",
            f"rfs:   remove it afterwards: {cli} rm {short}; {cli} rmi {image}",
        ]
    )


def build_many(args: argparse.Namespace) -> int:
    """Plan every package, then run their steps as one graph; print each image's path."""
    from rfs.commands import prepare_packages
    from rfs.pipeline.build import Job, execute_all
    from rfs.report.display import make_reporter
    from rfs.report.packages import PackageReporter
    from rfs.report.reporter import Reporter, Tee
    from rfs.run.store import Store

    packages: list[Path] = list(args.package)
    output_dir: Path = args.output_dir
    reporter: Reporter = make_reporter(sys.stderr, quiet=args.quiet)
    if args.json:
        from rfs.report.events import JsonReporter

        reporter = Tee(JsonReporter(sys.stdout, quiet=args.quiet, output=str(output_dir)), reporter)
    error: BaseException | None = None
    store: Store | None = None
    jobs: list[Job] = []
    # CI can name the run (its job id, say) so leftover containers are attributable.
    run_id = os.environ.get("RFS_RUN_ID") or uuid.uuid4().hex[:12]
    try:
        if not output_dir.is_dir():
            raise UsageError(f"--output-dir {output_dir}: no such directory")
        # One name per package only when there are several: one package reads as it always has.
        several = len(packages) > 1
        shown: dict[str, Reporter] = {}

        def report_to(name: str) -> Reporter:
            shown[name] = PackageReporter(reporter, name) if several else reporter
            return shown[name]

        store, planned = prepare_packages(
            args, output_dir, report_to, keep_failed=args.keep_failed, run_id=run_id
        )
        for name, one in planned:
            for warning in one.loaded.warnings:
                shown[name].message(f"rfs: warning: {name}: {warning}")
            jobs.append(Job(one, shown[name], name if several else ""))
        execute_all(jobs, jobs_of(args), args.shard_of)
        if args.verify:
            for job in jobs:
                verify_image(
                    job.planned.script.filesystem.type, job.planned.executor.output, reporter
                )
    except RfsError as exc:
        error = exc
        for job in jobs:  # --keep-failed: how to enter each kept container
            for container, step in job.kept.items():
                reporter.message(enter_hint(container, step, job.planned.facts.engine))
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if store is not None:
            store.close()
        reporter.close(error)
    if not args.json:
        for job in jobs:
            print(str(job.planned.executor.output))
    return EXIT_OK
