"""`rfs check` (alias `dry-run`): validate a package without running anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rfs.commands import add_package
from rfs.errors import EXIT_OK


def register(sub: Any) -> None:
    """Add the `check` parser."""
    p = sub.add_parser("check", aliases=["dry-run"], help="validate the build script")
    add_package(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate and print a one-line summary."""
    from rfs.package import load

    loaded = load(args.package)
    for warning in loaded.warnings:
        print(f"rfs: warning: {warning}", file=sys.stderr)
    s = loaded.script
    print(f"{args.package}: ok ({len(s.commands)} command(s), {len(s.overlays)} overlay(s), "
          f"{s.filesystem.type.value} image)")
    return EXIT_OK
