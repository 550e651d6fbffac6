"""Command-line interface: parses the command line (the parsers are in rfs/commands/), runs
the verb, and is the only place that turns errors into exit codes (worded by
`rfs.errors.report`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from rfs.commands import make_parser
from rfs.errors import EXIT_INTERRUPTED, Interrupted, RfsError, UsageError, report
from rfs.host import signals


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rfs` command; returns the exit code."""
    parser = make_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="rfs: %(levelname)s: %(message)s")
    if args.verb is None:
        parser.print_help(sys.stderr)
        return UsageError.exit_code
    try:
        # SIGTERM takes the same way out as Ctrl-C: through every clean-up (rfs.host.signals).
        with signals.handled():
            code: int = args.func(args)
        return code
    except Interrupted as exc:  # the build's one-line summary of what it kept
        print(f"rfs: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except RfsError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:  # before or after the steps: nothing was being built
        signum = signals.received()
        by = f" by {signals.name(signum)}" if signum is not None else ""
        print(f"rfs: interrupted{by}", file=sys.stderr)
        return EXIT_INTERRUPTED
