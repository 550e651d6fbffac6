"""Several packages in one build (`rfs build PKG... --output-dir DIR`): each package reports
through a `PackageReporter`, which names its steps `<package>/<step>` (`web/run[0]`) before
they reach the display, the JSON events and the summary shared by the whole build."""

from __future__ import annotations

import dataclasses

from rfs.graph.planner import Action, Decision
from rfs.graph.steps import Step
from rfs.report.reporter import Reporter


class PackageReporter(Reporter):
    """Forwards one package's reports to `inner` with its steps renamed `<name>/<step>`;
    `close` is left to whoever made `inner` (it closes once, for every package)."""

    def __init__(self, inner: Reporter, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self._steps: dict[str, Step] = {}

    def renamed(self, step: Step) -> Step:
        """`step` as the shared display names it."""
        found = self._steps.get(step.id)
        if found is None or found.key != step.key:
            found = dataclasses.replace(
                step,
                id=f"{self.name}/{step.id}",
                parents=tuple(f"{self.name}/{p}" for p in step.parents),
            )
            self._steps[step.id] = found
        return found

    def planned(self, decisions: list[Decision]) -> None:
        super().planned(decisions)
        self.inner.planned([dataclasses.replace(d, step=self.renamed(d.step)) for d in decisions])

    def reused(self, step: Step, action: Action, recorded: float | None) -> None:
        super().reused(step, action, recorded)
        self.inner.reused(self.renamed(step), action, recorded)

    def started(self, step: Step, reason: str) -> None:
        self.inner.started(self.renamed(step), reason)

    def output(self, step: Step, data: bytes) -> None:
        self.inner.output(self.renamed(step), data)

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        self.inner.progress(self.renamed(step), done, total)

    def finished(
        self, step: Step, seconds: float, size: int | None = None, detail: str = ""
    ) -> None:
        super().finished(step, seconds, size, detail)
        self.inner.finished(self.renamed(step), seconds, size, detail)

    def failed(self, step: Step, seconds: float, message: str) -> None:
        super().failed(step, seconds, message)
        self.inner.failed(self.renamed(step), seconds, message)

    def sharded(self, step: Step, what: str, shard: int, seconds: float) -> None:
        self.inner.sharded(self.renamed(step), what, shard, seconds)

    def message(self, text: str) -> None:
        self.inner.message(text)
