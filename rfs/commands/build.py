"""`rfs build` (alias `run`): build the image, rerunning only what changed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rfs.commands import add_cache_options, add_package, cache_dir, cache_size
from rfs.errors import EXIT_OK


def register(sub: Any) -> None:
    """Add the `build` parser."""
    p = sub.add_parser("build", aliases=["run"], help="build the image")
    add_package(p)
    add_cache_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="image file to write")
    p.add_argument("--no-network", action="store_true",
                   help="run the commands without network access")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the image."""
    from rfs.build import Options, execute, prepare
    from rfs.reporter import ConsoleReporter

    opts = Options(package=args.package, output=args.output, cache_dir=cache_dir(args),
                   cache_size=cache_size(args), network=not args.no_network)
    reporter = ConsoleReporter(quiet=args.quiet)
    planned = prepare(opts, reporter)
    for warning in planned.loaded.warnings:
        reporter.message(f"rfs: warning: {warning}")
    try:
        execute(planned, reporter)
    finally:
        planned.store.close()
    reporter.summary()
    print(str(opts.output))
    return EXIT_OK
