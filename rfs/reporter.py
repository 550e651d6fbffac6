"""Progress and events of a build. The runner reports here and never prints itself."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from rfs.planner import Action, Decision
from rfs.steps import Step


@dataclass
class StepResult:
    """What happened to one step, for the summary table."""

    step: Step
    action: Action
    seconds: float = 0.0
    size: int | None = None
    detail: str = ""


class Reporter:
    """Base reporter: records results; subclasses display them."""

    def __init__(self) -> None:
        self.results: dict[str, StepResult] = {}

    def planned(self, decisions: list[Decision]) -> None:
        """The plan is known; cached and skipped steps are final now."""
        for d in decisions:
            if d.action is not Action.RUN:
                self.results[d.step.id] = StepResult(d.step, d.action, detail=d.reason)

    def started(self, step: Step, reason: str) -> None:
        """`step` starts running because of `reason`."""

    def output(self, step: Step, data: bytes) -> None:
        """`step` printed `data` (a command's stdout/stderr)."""

    def finished(self, step: Step, seconds: float, size: int | None = None,
                 detail: str = "") -> None:
        """`step` completed successfully."""
        self.results[step.id] = StepResult(step, Action.RUN, seconds, size, detail)

    def failed(self, step: Step, seconds: float, message: str) -> None:
        """`step` failed."""

    def message(self, text: str) -> None:
        """A line of information outside any step (warnings, the output path)."""


def _size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


@dataclass
class ConsoleReporter(Reporter):
    """Plain line output for terminals and CI logs."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False  # hide commands' output

    def __post_init__(self) -> None:
        Reporter.__init__(self)
        self._pending = b""
        self._t0 = time.monotonic()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def planned(self, decisions: list[Decision]) -> None:
        super().planned(decisions)
        for d in decisions:
            if d.action is Action.CACHED:
                self._line(f"  cached   {d.step.id:<10} {d.step.label}")

    def started(self, step: Step, reason: str) -> None:
        self._line(f"  run      {step.id:<10} {step.label}  ({reason})")

    def output(self, step: Step, data: bytes) -> None:
        if self.quiet:
            return
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            self._line(f"  {step.id} | {raw.decode('utf-8', 'replace').rstrip()}")

    def _flush_output(self, step: Step) -> None:
        if self._pending and not self.quiet:
            self._line(f"  {step.id} | {self._pending.decode('utf-8', 'replace').rstrip()}")
        self._pending = b""

    def finished(self, step: Step, seconds: float, size: int | None = None,
                 detail: str = "") -> None:
        super().finished(step, seconds, size, detail)
        self._flush_output(step)
        extra = f", {_size(size)}" if size is not None else ""
        self._line(f"  done     {step.id:<10} {seconds:.2f} s{extra}")

    def failed(self, step: Step, seconds: float, message: str) -> None:
        self._flush_output(step)
        self._line(f"  FAILED   {step.id:<10} after {seconds:.2f} s: {message}")

    def message(self, text: str) -> None:
        self._line(text)

    def summary(self) -> None:
        """The closing table: each step, cached or ran, its time and artifact size."""
        ran = [r for r in self.results.values() if r.action is Action.RUN]
        cached = [r for r in self.results.values() if r.action is Action.CACHED]
        total = time.monotonic() - self._t0
        self._line(f"{len(ran)} step(s) ran, {len(cached)} cached, {total:.2f} s in all")
