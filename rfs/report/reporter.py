"""Progress and events of a build. The runner reports here and never prints itself.

`Reporter` is the contract between the build and whatever shows it; it also keeps the result of
every step for the closing summary. Displays:

- `ConsoleReporter`: plain lines, for CI logs and pipes (its line format is parsed by tests and
  scripts, so keep it stable);
- `rfs.report.progress.LiveReporter`: the live display with rich, for terminals;
- `rfs.report.events.JsonReporter`: JSON-lines events for machines (docs/events.md);
- `Tee`: several at once (`--json` with a human display on stderr).

`rfs.report.display.make_reporter` picks one for a stream (rich only when a terminal needs it).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rfs.graph.planner import Action, Decision
from rfs.graph.steps import Step, StepKind

# At most one plain progress line per step this often: CI logs show a long export advancing
# without drowning in lines.
PLAIN_PROGRESS_EVERY_S = 10.0


@dataclass
class StepResult:
    """What happened to one step, for the summary table."""

    step: Step
    action: Action
    seconds: float = 0.0
    size: int | None = None
    detail: str = ""
    failed: bool = False
    pending: bool = False  # planned to run, not (yet) run: a build that failed earlier
    # For a reused (cached or skipped) step: how long it took when it last ran, i.e. the time
    # the cache saved. None when that build did not record it.
    recorded: float | None = None

    @property
    def status(self) -> str:
        """ "ran", "failed", "not run" (an earlier step failed), "cached", or "skipped" (not
        needed: later steps are cached)."""
        if self.failed:
            return "failed"
        if self.pending:
            return "not run"
        return {Action.RUN: "ran", Action.CACHED: "cached", Action.SKIP: "skipped"}[self.action]


@dataclass(frozen=True)
class Summary:
    """The totals of a build, for the closing line and the `build_finished` event."""

    ran: int
    cached: int
    skipped: int
    failed: int
    pending: int  # planned to run but not reached
    seconds: float  # wall time since the reporter was made
    saved: float  # recorded durations of the reused steps


class Reporter:
    """Base reporter: records results; subclasses display them.

    Calls arrive in this order: `planned` once; then, in dependency order, `reused` for a cached
    or skipped step, or `started`, any number of `output`/`progress`, and `finished` or
    `failed` for a step that runs; `message` at any time; `close` once at the end.
    """

    def __init__(self) -> None:
        self.results: dict[str, StepResult] = {}
        self.t0 = time.monotonic()

    def planned(self, decisions: list[Decision]) -> None:
        """The plan is known; cached and skipped steps are final now."""
        for d in decisions:  # every step, so the summary keeps the plan's order
            self.results[d.step.id] = StepResult(
                d.step, d.action, detail=d.reason, pending=d.action is Action.RUN
            )

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        """`step` is cached or skipped; it took `recorded` seconds when it last ran."""
        result = self.results.get(step.id)
        if result is None:
            result = self.results[step.id] = StepResult(step, action)
        # A step planned to run can still be reused: another build made it meanwhile.
        result.action, result.pending, result.recorded = action, False, recorded

    def started(self, step: Step, reason: str) -> None:
        """`step` starts running because of `reason`."""

    def output(self, step: Step, data: bytes) -> None:
        """`step` printed `data` (a command's stdout/stderr)."""

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        """`step` has moved `done` bytes (of about `total`, when known). May come from any
        thread."""

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        """`step` completed successfully."""
        self.results[step.id] = StepResult(step, Action.RUN, seconds, size, detail)

    def failed(self, step: Step, seconds: float, message: str) -> None:
        """`step` failed."""
        self.results[step.id] = StepResult(step, Action.RUN, seconds, detail=message, failed=True)

    def sharded(self, step: Step, what: str, shard: int, seconds: float) -> None:
        """`rfs build --shard`: `what` is "waiting" (for shard `shard`, which owns `step`, to
        upload it; `seconds`: the deadline), "fetched" (it came after `seconds` of waiting)
        or "deadline" (it did not come in `seconds`: this runner builds it)."""
        self.message(shard_text(step, what, shard, seconds))

    def message(self, text: str) -> None:
        """A line of information outside any step (warnings, the output path)."""

    def close(self, error: BaseException | None = None) -> None:
        """The build is over (`error` says why it failed, if it did): show the summary."""

    def summary_totals(self) -> Summary:
        """Counts, wall time and the time the cache saved, from the results so far."""
        results = list(self.results.values())
        return Summary(
            ran=sum(r.status == "ran" for r in results),
            cached=sum(r.status == "cached" for r in results),
            skipped=sum(r.status == "skipped" for r in results),
            failed=sum(r.status == "failed" for r in results),
            seconds=time.monotonic() - self.t0,
            saved=sum(r.recorded or 0.0 for r in results if r.action is not Action.RUN),
            pending=sum(r.status == "not run" for r in results),
        )


class Tee(Reporter):
    """Reports to several reporters; the first one's view of the results is kept here too."""

    def __init__(self, *reporters: Reporter) -> None:
        super().__init__()
        self.reporters = reporters

    def planned(self, decisions: list[Decision]) -> None:
        super().planned(decisions)
        for r in self.reporters:
            r.planned(decisions)

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        for r in self.reporters:
            r.reused(step, action, recorded)

    def started(self, step: Step, reason: str) -> None:
        for r in self.reporters:
            r.started(step, reason)

    def output(self, step: Step, data: bytes) -> None:
        for r in self.reporters:
            r.output(step, data)

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        for r in self.reporters:
            r.progress(step, done, total)

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        for r in self.reporters:
            r.finished(step, seconds, size, detail)

    def failed(self, step: Step, seconds: float, message: str) -> None:
        super().failed(step, seconds, message)
        for r in self.reporters:
            r.failed(step, seconds, message)

    def sharded(self, step: Step, what: str, shard: int, seconds: float) -> None:
        for r in self.reporters:
            r.sharded(step, what, shard, seconds)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def close(self, error: BaseException | None = None) -> None:
        for r in self.reporters:
            r.close(error)


def shard_text(step: Step, what: str, shard: int, seconds: float) -> str:
    """The display's line for `Reporter.sharded`."""
    if what == "waiting":
        return f"  waiting  {step.id:<10} for shard {shard} to upload it (up to {seconds:.0f} s)"
    if what == "fetched":
        return f"  from     {step.id:<10} shard {shard} made it (waited {seconds:.1f} s)"
    return f"  deadline {step.id:<10} not uploaded by shard {shard} in {seconds:.0f} s: building it"


def format_size(n: int | None) -> str:
    """Bytes for people: "512 B", "3.4 MiB"; "" for None."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


_size = format_size  # the name other modules used before it was public


def format_seconds(s: float | None) -> str:
    """Durations for people: "0.42 s", "12.3 s", "2 min 05 s"; "" for None."""
    if s is None:
        return ""
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def artifact_size(step: Step, record: Mapping[str, Any], output: Path | None = None) -> int | None:
    """The size of what `step` produced, from its store record: the export tarball, or the
    image file (its apparent size; it is sparse). None for layers and overlay sets."""
    if "blob_size" in record:
        return int(record["blob_size"])
    if step.kind is StepKind.ASSEMBLE and output is not None:
        identity = record.get("outputs", {}).get(str(output.resolve()))
        if isinstance(identity, dict) and "size" in identity:
            return int(identity["size"])
    return None


def summary_rows(results: Mapping[str, StepResult]) -> list[tuple[str, str, str, str, str]]:
    """(step, result, time, size, what) for each step, in the order they were reported."""
    rows = []
    for r in results.values():
        if r.pending:
            when = ""
        elif r.action is Action.RUN:
            when = format_seconds(r.seconds)
        elif r.recorded is not None:
            when = f"({format_seconds(r.recorded)})"  # what it took when it last ran
        else:
            when = ""
        rows.append((r.step.id, r.status, when, format_size(r.size), r.step.label))
    return rows


def summary_line(totals: Summary) -> str:
    """The last line of a build: counts, time, and the time the cache saved."""
    line = f"{totals.ran} step(s) ran, {totals.cached} cached, {totals.seconds:.2f} s in all"
    if totals.failed:
        line = f"{totals.failed} step(s) failed, " + line
    if totals.saved > 0:
        line += f"; the cache saved {format_seconds(totals.saved)}"
    return line


class _Lines:
    """Splits a step's output chunks into lines, keeping partial lines until they complete.

    A carriage return (progress bars of apt, wget, curl) rewrites the line it is on: only the
    text after the last one is kept, so logs do not fill with a line per redraw.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return [self._text(raw) for raw in lines]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [self._text(rest)] if rest.strip() else []

    @staticmethod
    def _text(raw: bytes) -> str:
        raw = raw.rstrip(b"\r")
        return raw.rsplit(b"\r", 1)[-1].decode("utf-8", "replace").rstrip()


class StepLines:
    """A `_Lines` per step: the output of steps running at once (`rfs build -j`) never mixes
    within a line."""

    def __init__(self) -> None:
        self._steps: dict[str, _Lines] = {}
        self._lock = threading.Lock()

    def feed(self, step_id: str, data: bytes) -> list[str]:
        """The lines `data` completes in `step_id`'s output."""
        with self._lock:
            lines = self._steps.setdefault(step_id, _Lines())
        return lines.feed(data)

    def flush(self, step_id: str) -> list[str]:
        """What is left of `step_id`'s output, now that it ended."""
        with self._lock:
            lines = self._steps.pop(step_id, None)
        return lines.flush() if lines is not None else []


@dataclass
class ConsoleReporter(Reporter):
    """Plain line output for CI logs and pipes.

    Each line starts with two spaces and a word (`cached`, `run`, `done`, `FAILED`,
    `progress`) or with `<step id> |` for a command's output; scripts and tests parse this.
    """

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False  # hide commands' output

    def __post_init__(self) -> None:
        Reporter.__init__(self)
        self._lines = StepLines()  # per step: steps may run at once
        self._lock = threading.Lock()  # progress may come from another thread
        self._last_progress: dict[str, float] = {}

    def _line(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        if action is Action.CACHED:
            self._line(f"  cached   {step.id:<10} {step.label}")

    def started(self, step: Step, reason: str) -> None:
        self._last_progress[step.id] = time.monotonic()
        self._line(f"  run      {step.id:<10} {step.label}  ({reason})")

    def output(self, step: Step, data: bytes) -> None:
        if self.quiet:
            return
        for line in self._lines.feed(step.id, data):
            self._line(f"  {step.id} | {line}")

    def _flush_output(self, step: Step) -> None:
        lines = self._lines.flush(step.id)
        if not self.quiet:
            for line in lines:
                self._line(f"  {step.id} | {line}")

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(step.id, now) < PLAIN_PROGRESS_EVERY_S:
            return
        self._last_progress[step.id] = now
        of = f" of about {format_size(total)}" if total else ""
        self._line(f"  progress {step.id:<10} {format_size(done)}{of}")

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        self._flush_output(step)
        extra = f", {format_size(size)}" if size is not None else ""
        how = f" ({detail})" if detail else ""  # e.g. how the image was made
        self._line(f"  done     {step.id:<10} {seconds:.2f} s{extra}{how}")

    def failed(self, step: Step, seconds: float, message: str) -> None:
        super().failed(step, seconds, message)
        self._flush_output(step)
        self._line(f"  FAILED   {step.id:<10} after {seconds:.2f} s: {message}")

    def message(self, text: str) -> None:
        self._line(text)

    def close(self, error: BaseException | None = None) -> None:
        if self.results:  # nothing to sum up when the build stopped before its plan
            self.summary()

    def summary(self) -> None:
        """The closing table: each step, cached or ran, its time and artifact size."""
        rows = summary_rows(self.results)
        if rows:
            header = ("step", "result", "time", "size", "")
            widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
            for row in [header, *rows]:
                cells = [
                    row[i].ljust(widths[i]) if i in (0, 1) else row[i].rjust(widths[i])
                    for i in range(4)
                ]
                self._line(("  " + "  ".join(cells) + "  " + row[4]).rstrip())
        self._line(summary_line(self.summary_totals()))
