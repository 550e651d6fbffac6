"""Command-line interface: parses arguments, prints, and is the only place that picks exit codes."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rfs import __version__
from rfs.errors import EXIT_INTERRUPTED, EXIT_OK, RfsError, ScriptError, UsageError

if TYPE_CHECKING:
    from rfs.build import Options

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse "20G", "512M", "1024" (bytes) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 20G or 512M)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rfs", description="Build microVM root filesystem images from a build script, "
                                "rerunning only the steps whose inputs changed.")
    parser.add_argument("--version", action="version", version=f"rfs {__version__}")
    parser.add_argument("-l", "--log-level", default="warning",
                        choices=["trace", "debug", "info", "warn", "warning", "error"],
                        help="how much rfs itself logs (default: warning)")
    parser.add_argument("-e", "--no-exec-logs", "-q", "--quiet", dest="quiet",
                        action="store_true", help="do not show the commands' output")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("package", type=Path,
                       help="a build script (.toml/.yaml) or a directory with build.toml")
        p.add_argument("--cache-dir", type=Path, default=None,
                       help="cache directory (default: $RFS_CACHE_DIR, "
                            "$XDG_CACHE_HOME/rfs or ~/.cache/rfs)")
        p.add_argument("--cache-size", type=parse_size, default=None,
                       help="evict least recently used artifacts above this size "
                            "(default 20G)")

    build = sub.add_parser("build", aliases=["run"], help="build the image")
    common(build)
    build.add_argument("-o", "--output", type=Path, required=True, help="image file to write")
    build.add_argument("--no-network", action="store_true",
                       help="run the commands without network access")
    plan = sub.add_parser("plan", help="show each step: cached or to run, and why")
    common(plan)
    plan.add_argument("-o", "--output", type=Path, default=None,
                      help="the image file the build would write (default: the last one)")
    check = sub.add_parser("check", aliases=["dry-run"], help="validate the build script")
    check.add_argument("package", type=Path)
    return parser


def _options(args: argparse.Namespace) -> Options:
    from rfs.build import Options
    from rfs.store import DEFAULT_SIZE_LIMIT, default_cache_dir

    return Options(
        package=args.package,
        output=getattr(args, "output", None),
        cache_dir=args.cache_dir or default_cache_dir(),
        cache_size=args.cache_size or DEFAULT_SIZE_LIMIT,
        network=not getattr(args, "no_network", False),
    )


def _print_warnings(problems: Sequence[object]) -> None:
    for p in problems:
        print(f"rfs: warning: {p}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the package and print what was found."""
    from rfs.package import load

    loaded = load(args.package)
    _print_warnings(loaded.warnings)
    s = loaded.script
    print(f"{args.package}: ok ({len(s.commands)} command(s), {len(s.overlays)} overlay(s), "
          f"{s.filesystem.type.value} image)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Print every step with its key and whether it is cached or will run, and why."""
    from rfs.build import prepare
    from rfs.reporter import Reporter

    opts = _options(args)
    planned = prepare(opts, Reporter())
    _print_warnings(planned.loaded.warnings)
    for d in planned.decisions:
        print(f"{d.action.value:<7} {d.step.id:<10} {d.step.key[:12]}  {d.step.label}"
              + (f"\n{'':30}why: {d.reason}" if d.action.value == "run" else ""))
    n = len(planned.to_run())
    print(f"{n} step(s) to run" if n else "nothing to do: the image is up to date")
    planned.store.close()
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    """Build the image, rerunning only what changed."""
    from rfs.build import execute, prepare
    from rfs.reporter import ConsoleReporter

    opts = _options(args)
    reporter = ConsoleReporter(quiet=args.quiet)
    planned = prepare(opts, reporter)
    _print_warnings(planned.loaded.warnings)
    try:
        execute(planned, reporter)
    finally:
        planned.store.close()
    reporter.summary()
    print(str(opts.output))
    return EXIT_OK


def _report(exc: RfsError) -> None:
    print(f"rfs: error: {exc.message}", file=sys.stderr)
    if isinstance(exc, ScriptError):
        for p in exc.problems:
            label = "warning" if p.severity == "warning" else "error"
            if str(p) not in exc.message:
                print(f"rfs: {label}: {p}", file=sys.stderr)
    if exc.hint:
        print(f"rfs: hint: {exc.hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rfs` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="rfs: %(levelname)s: %(message)s")
    handlers = {"build": cmd_build, "run": cmd_build, "plan": cmd_plan, "check": cmd_check,
                "dry-run": cmd_check}
    if args.verb is None:
        parser.print_help(sys.stderr)
        return UsageError.exit_code
    try:
        return handlers[args.verb](args)
    except RfsError as exc:
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
