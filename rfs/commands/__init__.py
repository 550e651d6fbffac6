"""One module per `rfs` verb. Each has `register(subparsers)`, which adds its parser(s) and sets
`func` (taking the parsed arguments, returning an exit code). `make_parser` builds the command
line's parser from them; `cli.py` runs the verb and is the only place that turns errors into
exit codes. Nothing here imports `rfs.cli`.

May import every package below it; never `rfs.cli`.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs import __version__
from rfs.run.store import DEFAULT_SIZE_LIMIT, default_cache_dir

if TYPE_CHECKING:
    from collections.abc import Callable

    from rfs.pipeline.build import Options, Planned
    from rfs.report.reporter import Reporter
    from rfs.run.store import Store

MODULES = ("build", "plan", "check", "cache", "pack", "graph", "completion", "boot")


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse "20G", "512M", "1024" (bytes) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 20G or 512M)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


# Verbs whose module name differs from the verb.
_ALIASES = {"run": "build", "dry-run": "check"}


def _verb_module(argv: Sequence[str]) -> str | None:
    """The command module `argv` names, if it clearly names one (options before it skipped)."""
    items = iter(argv)
    for arg in items:
        if arg in ("-l", "--log-level"):
            next(items, None)
        elif not arg.startswith("-"):
            name = _ALIASES.get(arg, arg)
            return name if name in MODULES else None
    return None


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of `rfs`: with `argv` naming a verb, only that verb's (building
    all of them costs ~0.03 s, a tenth of an up-to-date build); else every verb's."""
    only = _verb_module(argv) if argv is not None else None

    parser = argparse.ArgumentParser(
        prog="rfs",
        description="Build microVM root filesystem images from a build script, "
        "rerunning only the steps whose inputs changed.",
    )
    parser.add_argument("--version", action="version", version=f"rfs {__version__}")
    _global_options(parser, None)
    # The same options are accepted after the verb too (`rfs build -q …`); there they must not
    # overwrite a value given before it with their default.
    after_verb = argparse.ArgumentParser(add_help=False)
    _global_options(after_verb, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    original = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return original(name, parents=[after_verb], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for name in MODULES if only is None else (only,):
        importlib.import_module(f"rfs.commands.{name}").register(sub)
    return parser


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-l",
        "--log-level",
        default=default or "warning",
        choices=["trace", "debug", "info", "warn", "warning", "error"],
        help="how much rfs itself logs (default: warning)",
    )
    parser.add_argument(
        "-e",
        "--no-exec-logs",
        "-q",
        "--quiet",
        dest="quiet",
        action="store_true",
        default=default or False,
        help="do not show the commands' output",
    )


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """Options every verb that reads or writes the local cache takes."""
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $RFS_CACHE_DIR, $XDG_CACHE_HOME/rfs or ~/.cache/rfs)",
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        help="evict least recently used artifacts above this size (default 20G)",
    )


def add_force_options(p: argparse.ArgumentParser) -> None:
    """Options that make steps run although they are cached (build and plan take them)."""
    p.add_argument(
        "--no-cache", action="store_true", help="run every step; its result replaces the cached one"
    )
    p.add_argument(
        "--rebuild",
        action="append",
        default=[],
        metavar="STEP",
        help="run STEP (e.g. run[0], export, assemble) and every step after it "
        "although cached; repeatable",
    )
    p.add_argument(
        "--pull",
        action="store_true",
        help="look the base image's tag up in its registry again (a moved tag "
        "makes every step run)",
    )
    add_platform_option(p)
    p.add_argument(
        "--no-network",
        action="store_true",
        help="run the commands without network access (part of their keys)",
    )


def add_platform_option(p: argparse.ArgumentParser) -> None:
    """--platform (build, plan, graph, check)."""
    p.add_argument(
        "--platform",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help="build for this platform (e.g. linux/arm64); wins over container.platform",
    )


def build_options(args: argparse.Namespace, output: Path | None, **more: Any) -> Options:
    """The build `Options` the arguments ask for: package, output, cache and the options of
    `add_force_options`; `more` sets the rest (`keep_failed`)."""
    from rfs.pipeline.build import Options

    return Options(
        package=args.package,
        output=output,
        cache_dir=cache_dir(args),
        cache_size=cache_size(args),
        no_cache=args.no_cache,
        rebuild=tuple(args.rebuild),
        pull=args.pull,
        platform=args.platform,
        network=not args.no_network,
        **more,
    )


def add_package(p: argparse.ArgumentParser) -> None:
    """The PACKAGE positional argument."""
    p.add_argument(
        "package", type=Path, help="a build script (.toml/.yaml) or a directory with build.toml"
    )


def cache_dir(args: argparse.Namespace) -> Path:
    """The cache directory the arguments and environment ask for."""
    return args.cache_dir or default_cache_dir()


def cache_size(args: argparse.Namespace) -> int:
    """The cache size limit the arguments ask for."""
    return args.cache_size or DEFAULT_SIZE_LIMIT


def add_packages(p: argparse.ArgumentParser) -> None:
    """The PACKAGE... positional argument of the verbs that take several (docs/many-images.md)."""
    p.add_argument(
        "package",
        type=Path,
        nargs="+",
        help="build scripts (.toml/.yaml) or directories with build.toml; several are one "
        "graph (docs/many-images.md)",
    )


def package_names(packages: list[Path]) -> list[str]:
    """Each package's image name; two packages of one name are refused before anything runs
    (their images would overwrite each other)."""
    from rfs.errors import UsageError
    from rfs.pipeline.build import image_name

    seen: dict[str, Path] = {}
    names = []
    for package in packages:
        name = image_name(package)
        if name in seen:
            raise UsageError(
                f"{seen[name]} and {package} are both named {name!r}: their images would "
                "land at the same path; rename one (its directory, or its script file)"
            )
        seen[name] = package
        names.append(name)
    return names


def prepare_packages(
    args: argparse.Namespace,
    output_dir: Path | None,
    reporter: Callable[[str], Reporter],
    **more: Any,
) -> tuple[Store, list[tuple[str, Planned]]]:
    """Plan each of `args.package` (names checked first) with one store: (store, [(name,
    plan)]). `reporter(name)` gives the reporter of each package; `more` sets `Options`
    fields. On failure the store is closed here; else the caller closes it."""
    from rfs.pipeline.build import prepare, release_snapshots
    from rfs.remote.config import remote_settings
    from rfs.run.store import Store

    packages: list[Path] = list(args.package)
    names = package_names(packages)
    store = Store(cache_dir(args), cache_size(args))
    planned: list[tuple[str, Planned]] = []
    try:
        for package, name in zip(packages, names, strict=True):
            args.package = package
            opts = build_options(args, None, **more)
            opts.output_dir = output_dir
            # As a single package's verb does: only those with the remote flags look there.
            opts.remote = remote_settings(args) if hasattr(args, "cache_from") else None
            planned.append((name, prepare(opts, reporter(name), store=store)))
    except BaseException:
        for _, one in planned:
            if one.remote is not None:
                one.remote.close()
        release_snapshots(one for _, one in planned)
        store.close()
        raise
    finally:
        args.package = packages
    return store, planned
