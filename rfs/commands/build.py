"""`rfs build` (alias `run`): build the image, rerunning only what changed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rfs.commands import add_cache_options, add_force_options, add_package, build_options
from rfs.errors import EXIT_OK


def register(sub: Any) -> None:
    """Add the `build` parser."""
    p = sub.add_parser("build", aliases=["run"], help="build the image")
    add_package(p)
    add_cache_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="image file to write")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the image (again on every change of the package, with --watch)."""
    if args.watch:
        from rfs.commands.watch import watch

        return watch(args.package, lambda: build_once(args), ignore=[args.output], out=sys.stderr)
    return build_once(args)


def build_once(args: argparse.Namespace) -> int:
    """Build the image once, reporting to the terminal, the log or JSON as asked."""
    from rfs.errors import StepFailed
    from rfs.pipeline.build import execute, prepare
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
            execute(planned, reporter)
            if args.verify:
                verify_image(planned.script.filesystem.type, planned.executor.output, reporter)
        finally:
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
