"""Which display a stream gets: the live one (rich) on a terminal, plain lines elsewhere.

Kept apart from `rfs.report.reporter` so that the live display (`rfs.report.progress`),
which builds on the reporter, and the choice between them import in one direction only.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rfs.report.reporter import ConsoleReporter, Reporter


def wants_live(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that can show the live display (not TERM=dumb)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") not in ("", "dumb")


def make_reporter(
    stream: TextIO | None = None, *, quiet: bool = False, live: bool | None = None
) -> Reporter:
    """The human display for `stream` (stderr by default): live on a terminal, else plain."""
    stream = stream if stream is not None else sys.stderr
    if live if live is not None else wants_live(stream):
        from rfs.report.progress import LiveReporter  # rich is imported only here

        return LiveReporter(stream, quiet=quiet)
    return ConsoleReporter(stream, quiet)
