"""The live display of a build in a terminal, with rich.

What finished stays in the terminal's scrollback, one line per step; a command's output is
printed under its step as it arrives (the step's header line comes first). A live footer, redrawn
in place and gone at the end, shows the running step with its elapsed time, and a byte bar for
the export and the assembly. The end is a summary table. `-q` hides the commands' output.

Imported only when stderr is a terminal: rich costs ~50 ms at start-up.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from rfs.graph.planner import Action, Decision
from rfs.graph.steps import Step
from rfs.report.reporter import (
    Reporter,
    StepLines,
    format_seconds,
    format_size,
    summary_line,
    summary_rows,
)

_STATUS_STYLE = {
    "ran": "green",
    "cached": "cyan",
    "skipped": "dim",
    "failed": "bold red",
    "not run": "dim",
}


@dataclass
class _Running:
    """A running step, as the footer shows it."""

    step: Step
    reason: str
    since: float
    bytes: tuple[int, int | None] | None = None
    header_shown: bool = False


class LiveReporter(Reporter):
    """Live progress on a terminal; see the module docstring."""

    def __init__(
        self, stream: TextIO, *, quiet: bool = False, console: Console | None = None
    ) -> None:
        super().__init__()
        self.quiet = quiet
        # `console` lets tests pose as a terminal of a fixed size.
        self.console = console or Console(file=stream, highlight=False, soft_wrap=False)
        self._lock = threading.Lock()
        # The steps running now (several with `rfs build -j`), in the order they started.
        self._running: dict[str, _Running] = {}
        self._last_header: str | None = None  # whose output the last lines printed were
        self._lines = StepLines()  # per step: steps may run at once
        self._spinner = Spinner("dots", style="cyan")
        self._to_run = 0
        self._started = 0
        self._closed = False
        # Last: Live renders the footer once on creation, which reads the state above.
        self._live = Live(
            console=self.console,
            get_renderable=self._footer,
            refresh_per_second=10,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    # the footer -------------------------------------------------------------------------

    def _footer(self) -> RenderableType:
        parts: list[RenderableType] = []
        for running in list(self._running.values()):
            parts.extend(self._running_lines(running))
        cached = sum(r.status == "cached" for r in self.results.values())
        parts.append(
            Text(
                f"   step {max(self._started, 1)} of {self._to_run} to run"
                f" · {cached} cached · {format_seconds(time.monotonic() - self.t0)}",
                style="dim",
            )
        )
        return Group(*parts)

    def _running_lines(self, running: _Running) -> list[RenderableType]:
        step = running.step
        line = Table.grid(padding=(0, 1))
        line.add_column(no_wrap=True)
        line.add_column(no_wrap=True)
        line.add_column(no_wrap=True, style="bold")
        line.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        line.add_column(no_wrap=True, justify="right")
        elapsed = time.monotonic() - running.since
        line.add_row(
            self._spinner,
            Text("running ", style="yellow"),
            step.id,
            Text(step.label, style="dim"),
            format_seconds(elapsed),
        )
        parts: list[RenderableType] = [line]
        progress = running.bytes
        if progress is not None:
            done, total = progress
            bar = Table.grid(padding=(0, 1))
            bar.add_column(width=3)
            bar.add_column(width=30)
            bar.add_column(no_wrap=True)
            of = f" of ~{format_size(total)}" if total else ""
            bar.add_row(
                "",
                ProgressBar(
                    total=float(total) if total else None,
                    completed=float(min(done, total or done)),
                ),
                f"{format_size(done)}{of}",
            )
            parts.append(bar)
        return parts

    def _print(self, renderable: RenderableType) -> None:
        self.console.print(renderable, overflow="ellipsis", no_wrap=True, crop=True)

    def _step_line(
        self, mark: str, style: str, word: str, step: Step, tail: str = "", note: str = ""
    ) -> Text:
        text = Text("  ")
        text.append(f"{mark} {word:<8}", style=style)
        text.append(f"{step.id:<10} ", style="bold")
        text.append(step.label)
        if tail:
            text.append(f"  {tail}")
        if note:
            text.append(f"  ({note})", style="dim")
        return text

    # the Reporter calls ---------------------------------------------------------------------

    def planned(self, decisions: list[Decision]) -> None:
        super().planned(decisions)
        # Once per package: a build of several packages adds them up.
        self._to_run += sum(d.action is Action.RUN for d in decisions)
        if self._to_run:
            self._live.start()

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        if action is Action.CACHED:
            note = f"saved {format_seconds(recorded)}" if recorded else ""
            self._print(self._step_line("✓", "cyan", "cached", step, note=note))

    def started(self, step: Step, reason: str) -> None:
        with self._lock:
            self._running[step.id] = _Running(step, reason, time.monotonic())
            self._started += 1

    def _header(self, step: Step) -> None:
        running = self._running.get(step.id)
        if running is None:
            return
        # Again when another step's output came in between: lines of steps running at once
        # stay under the header of their own step.
        if not running.header_shown or self._last_header != step.id:
            note = running.reason if not running.header_shown else "continued"
            running.header_shown = True
            self._last_header = step.id
            self._print(self._step_line("▶", "yellow", "run", step, note=note))

    def output(self, step: Step, data: bytes) -> None:
        if self.quiet:
            return
        for line in self._lines.feed(step.id, data):
            self._out(step, line)

    def _out(self, step: Step, line: str) -> None:
        self._header(step)
        text = Text("    │ ", style="dim")
        text.append(Text.from_ansi(line))
        self._print(text)

    def _flush(self, step: Step) -> None:
        for line in self._lines.flush(step.id):
            if not self.quiet:
                self._out(step, line)

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        running = self._running.get(step.id)
        if running is not None:
            running.bytes = (done, total)  # one assignment: safe from the polling thread

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        self._flush(step)
        tail = format_seconds(seconds) + (f"  {format_size(size)}" if size is not None else "")
        with self._lock:
            running = self._running.pop(step.id, None)
        note = "" if running is None or running.header_shown else running.reason
        self._print(self._step_line("✓", "green", "done", step, tail, note))

    def failed(self, step: Step, seconds: float, message: str) -> None:
        super().failed(step, seconds, message)
        self._flush(step)
        with self._lock:
            self._running.pop(step.id, None)
        self._print(
            self._step_line("✗", "bold red", "FAILED", step, f"after {format_seconds(seconds)}")
        )
        self.console.print(Text(f"    {message}", style="red"), soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._live.stop()
        if not self.results:  # stopped before its plan: the error says it all
            return
        rows = summary_rows(self.results)
        if rows:
            table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold dim")
            # Every column but the label keeps its full width; the label gives way.
            columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
                ("step", "left"),
                ("result", "left"),
                ("time", "right"),
                ("size", "right"),
            )
            for i, (name, justify) in enumerate(columns):
                width = max(len(name), *(len(row[i]) for row in rows))
                table.add_column(name, justify=justify, no_wrap=True, min_width=width)
            table.add_column("", overflow="ellipsis", no_wrap=True, style="dim", ratio=1)
            for step_id, status, when, size, label in rows:
                table.add_row(
                    Text(step_id),
                    Text(status, style=_STATUS_STYLE[status]),
                    when,
                    size,
                    Text(label),
                )
            self.console.print()
            self.console.print(table)
        style = "bold red" if error is not None else "bold"
        self.console.print(Text(summary_line(self.summary_totals()), style=style))
