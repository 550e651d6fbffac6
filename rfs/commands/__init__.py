"""One module per `rfs` verb. Each has `register(subparsers)`, which adds its parser(s) and sets
`func` (taking the parsed arguments, returning an exit code). `cli.py` wires them together and
is the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
from pathlib import Path

from rfs.store import DEFAULT_SIZE_LIMIT, default_cache_dir

MODULES = ("build", "plan", "check", "cache", "pack", "graph", "completion", "boot")


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """Options every verb that reads or writes the local cache takes."""
    from rfs.cli import parse_size

    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default: $RFS_CACHE_DIR, $XDG_CACHE_HOME/rfs or "
                        "~/.cache/rfs)")
    p.add_argument("--cache-size", type=parse_size, default=None,
                   help="evict least recently used artifacts above this size (default 20G)")


def add_package(p: argparse.ArgumentParser) -> None:
    """The PACKAGE positional argument."""
    p.add_argument("package", type=Path,
                   help="a build script (.toml/.yaml) or a directory with build.toml")


def cache_dir(args: argparse.Namespace) -> Path:
    """The cache directory the arguments and environment ask for."""
    return args.cache_dir or default_cache_dir()


def cache_size(args: argparse.Namespace) -> int:
    """The cache size limit the arguments ask for."""
    return args.cache_size or DEFAULT_SIZE_LIMIT
