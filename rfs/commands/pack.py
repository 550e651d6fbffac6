"""`rfs pack` and `rfs unpack`: convert a package between its four forms."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rfs.errors import EXIT_OK

TYPES = ("tar-gz", "tar", "directory", "build-script")


def register(sub: Any) -> None:
    """Add the `pack` and `unpack` parsers."""
    p = sub.add_parser(
        "pack",
        help="write a package as a directory, tar, tar-gz or single build script",
        description="Write the package SRC (a build script, a directory with build.toml, or a "
        ".tar/.tar.gz package) to DST as TYPE. Only the build script and the files "
        "it references are written; DST must lie outside SRC.",
    )
    p.add_argument("source", type=Path, metavar="SRC", help="the package to pack")
    p.add_argument(
        "destination",
        type=Path,
        metavar="DST",
        help="file to write (a new or empty directory for --type directory)",
    )
    p.add_argument(
        "-t", "--type", required=True, choices=TYPES, dest="package_type", help="the form to write"
    )
    p.set_defaults(func=run_pack)
    u = sub.add_parser(
        "unpack",
        help="unpack a .tar/.tar.gz package into a directory",
        description="Unpack the archive package SRC into the new or empty directory DST. "
        "Members that would land outside DST are refused, each by name.",
    )
    u.add_argument("source", type=Path, metavar="SRC", help="a .tar or .tar.gz package")
    u.add_argument("destination", type=Path, metavar="DST", help="the directory to create")
    u.set_defaults(func=run_unpack)


def run_pack(args: argparse.Namespace) -> int:
    """Pack SRC into DST."""
    from rfs.script.archive import PackageType
    from rfs.script.packing import pack

    count = pack(args.source, args.destination, PackageType(args.package_type))
    print(f"{args.destination}: {args.package_type} package with {count} file(s)")
    return EXIT_OK


def run_unpack(args: argparse.Namespace) -> int:
    """Unpack SRC into DST."""
    from rfs.script.packing import unpack

    print(unpack(args.source, args.destination))
    return EXIT_OK
