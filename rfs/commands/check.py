"""`rfs check` (alias `dry-run`): find every problem before any container starts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rfs.commands import add_package, add_platform_option
from rfs.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_OK, Problem


def register(sub: Any) -> None:
    """Add the `check` parser."""
    p = sub.add_parser(
        "check",
        aliases=["dry-run"],
        help="find every problem before building",
        description="Report every problem of the build script, its package and this machine "
        "at once, each with its field path: unknown keys (warnings), wrong or "
        "missing fields, missing or escaping package files, sizes, the mkfs tool, "
        "the engine and the base image. Exit 2 for script problems, 3 when only "
        "the machine is not ready.",
    )
    add_package(p)
    add_platform_option(p)
    p.add_argument(
        "--script-only",
        action="store_true",
        help="check the script and package only, not the engine or tools",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every finding; return the exit code they call for."""
    from rfs.run.checks import environment_problems
    from rfs.script.package import collect

    script, problems = collect(args.package)
    if script is not None and args.platform is not None:
        from rfs.script.platform import with_platform

        script = with_platform(script, args.platform)
    script_errors = any(p.severity == "error" for p in problems)
    environment: list[Problem] = []
    if script is not None and not args.script_only:
        file = (
            f"{script.origin}:{script.script_file.name}"
            if script.origin
            else str(script.script_file)
        )
        environment = environment_problems(script, file)
    for p in [*problems, *environment]:
        print(f"rfs: {p.severity}: {p}", file=sys.stderr)
    errors = sum(p.severity == "error" for p in [*problems, *environment])
    warnings = sum(p.severity == "warning" for p in problems)
    if errors:
        print(f"rfs: {args.package}: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
        return EXIT_BAD_INPUT if script_errors else EXIT_ENVIRONMENT
    assert script is not None
    print(
        f"{args.package}: ok ({len(script.commands)} command(s), {len(script.overlays)} "
        f"overlay(s), {script.filesystem.type.value} image"
        f"{', engine and tools not checked' if args.script_only else ''}"
        f"{f', {warnings} warning(s)' if warnings else ''})"
    )
    return EXIT_OK
