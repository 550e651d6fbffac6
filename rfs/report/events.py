"""JSON-lines events of a build, for machines (`rfs build --json`, `rfs plan --json`).

One JSON object per line, flushed as it happens. Every event has `v` (the schema version),
`event` (its type) and `time` (Unix seconds). The schema is docs/events.schema.json and the
prose docs/events.md; a test validates what this module emits against the schema, so change
the three together and bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from rfs.errors import EXIT_OK, RfsError
from rfs.graph.planner import Action, Decision
from rfs.graph.steps import Step
from rfs.report.reporter import Reporter, StepLines

SCHEMA_VERSION = 1
# step_progress events at most this often per step: enough to drive a bar, not a flood.
PROGRESS_EVERY_S = 0.5


def step_fields(step: Step) -> dict[str, Any]:
    """The fields every step event carries."""
    return {"step": step.id, "kind": step.kind.value, "key": step.key}


def plan_steps(
    decisions: Sequence[Decision], changes: Mapping[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """The `steps` array of a `plan` event; `changes` adds each step's explained differences."""
    steps = []
    for d in decisions:
        item = {
            **step_fields(d.step),
            "label": d.step.label,
            "parents": list(d.step.parents),
            "action": d.action.value,
            "reason": d.reason,
        }
        if changes is not None and d.step.id in changes:
            item["changes"] = list(changes[d.step.id])
        steps.append(item)
    return steps


class JsonReporter(Reporter):
    """Writes the events of a build to `stream` (stdout), one JSON object per line."""

    def __init__(
        self, stream: TextIO | None = None, *, quiet: bool = False, output: str | None = None
    ) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.output_path = output
        self._lock = threading.Lock()
        self._lines = StepLines()  # per step: steps may run at once
        self._last_progress: dict[str, float] = {}
        self._closed = False

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event."""
        line = json.dumps(
            {"v": SCHEMA_VERSION, "event": event, "time": round(time.time(), 3), **fields},
            ensure_ascii=False,
            sort_keys=False,
        )
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def planned(self, decisions: list[Decision]) -> None:
        super().planned(decisions)
        self.emit("plan", steps=plan_steps(decisions))

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        event = "step_cached" if action is Action.CACHED else "step_skipped"
        self.emit(
            event,
            **step_fields(step),
            recorded_seconds=None if recorded is None else round(recorded, 3),
        )

    def started(self, step: Step, reason: str) -> None:
        self._last_progress.pop(step.id, None)
        self.emit("step_started", **step_fields(step), reason=reason)

    def output(self, step: Step, data: bytes) -> None:
        if self.quiet:
            return
        for line in self._lines.feed(step.id, data):
            self.emit("step_output", step=step.id, text=line)

    def _flush(self, step: Step) -> None:
        for line in self._lines.flush(step.id):
            if not self.quiet:
                self.emit("step_output", step=step.id, text=line)

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(step.id, 0.0) < PROGRESS_EVERY_S:
            return
        self._last_progress[step.id] = now
        self.emit("step_progress", step=step.id, bytes=done, total_bytes=total)

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        self._flush(step)
        self.emit("step_finished", **step_fields(step), seconds=round(seconds, 3), bytes=size)

    def failed(self, step: Step, seconds: float, message: str) -> None:
        super().failed(step, seconds, message)
        self._flush(step)
        self.emit("step_failed", **step_fields(step), seconds=round(seconds, 3), error=message)

    def sharded(self, step: Step, what: str, shard: int, seconds: float) -> None:
        # step_waiting: `deadline_seconds`; step_fetched / step_deadline: `waited_seconds`.
        how = "deadline_seconds" if what == "waiting" else "waited_seconds"
        fields = {how: round(seconds, 3)}
        self.emit(f"step_{what}", **step_fields(step), shard=shard, **fields)

    def message(self, text: str) -> None:
        self.emit("message", text=text)

    def close(self, error: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        totals = self.summary_totals()
        if error is None:
            code, text = EXIT_OK, None
        elif isinstance(error, RfsError):
            code, text = error.exit_code, error.message
        else:  # KeyboardInterrupt reaching us before the build turned it into Interrupted
            from rfs.errors import EXIT_INTERRUPTED

            code, text = EXIT_INTERRUPTED, "interrupted"
        self.emit(
            "build_finished",
            ok=error is None,
            exit_code=code,
            error=text,
            output=self.output_path if error is None else None,
            seconds=round(totals.seconds, 3),
            ran=totals.ran,
            cached=totals.cached,
            skipped=totals.skipped,
            failed=totals.failed,
            saved_seconds=round(totals.saved, 3),
        )
