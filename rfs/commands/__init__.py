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


def add_force_options(p: argparse.ArgumentParser) -> None:
    """Options that make steps run although they are cached (build and plan take them)."""
    p.add_argument("--no-cache", action="store_true",
                   help="run every step; its result replaces the cached one")
    p.add_argument("--rebuild", action="append", default=[], metavar="STEP",
                   help="run STEP (e.g. run[0], export, assemble) and every step after it "
                        "although cached; repeatable")
    p.add_argument("--pull", action="store_true",
                   help="look the base image's tag up in its registry again (a moved tag "
                        "makes every step run)")
    p.add_argument("--no-network", action="store_true",
                   help="run the commands without network access (part of their keys)")


def force_options(args: argparse.Namespace) -> dict[str, object]:
    """The `Options` fields `add_force_options` sets."""
    return {"no_cache": args.no_cache, "rebuild": tuple(args.rebuild), "pull": args.pull,
            "network": not args.no_network}


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
