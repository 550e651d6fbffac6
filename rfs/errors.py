"""The exceptions rfs raises, and the exit code each maps to.

    RfsError                     root; `cli` turns any of these into one line and an exit code
    ├── ScriptError        (2)   the build script or package is wrong (carries every problem)
    ├── UsageError         (2)   the command line is wrong
    ├── EnvironmentProblem (3)   the machine is not ready: engine down, tool missing, no space
    │   ├── EngineError    (3)   the container engine failed or is unreachable
    │   └── RemoteCacheError (3) a remote cache failed (a warning unless --cache-strict)
    ├── StepFailed         (1)   a build step ran and failed (names the step)
    │   └── StartFailed    (1)   its container could not start
    └── Interrupted      (130)   SIGINT / SIGTERM

Foreign exceptions (requests, docker, OSError) are translated at the adapter boundary, so
nothing above the adapters ever sees them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130


class RfsError(Exception):
    """Root of every error rfs reports to a person."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a build script, located by file and field path."""

    path: str  # e.g. "commands[1].script_path"
    message: str
    file: str = ""
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        field = f"{self.path}: " if self.path else ""
        return f"{where}{field}{self.message}"


class ScriptError(RfsError):
    """The build script or package is invalid; `problems` lists every finding."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Sequence[Problem], hint: str | None = None) -> None:
        errors = [p for p in problems if p.severity == "error"]
        self.problems = tuple(problems)
        first = str(errors[0]) if errors else "invalid build script"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        super().__init__(first + more, hint)


class UsageError(RfsError):
    """The command line asks for something impossible."""

    exit_code = EXIT_BAD_INPUT


class EnvironmentProblem(RfsError):
    """The machine lacks something rfs needs: a tool, disk space, a reachable engine."""

    exit_code = EXIT_ENVIRONMENT


class EngineError(EnvironmentProblem):
    """The container engine is unreachable or refused a request."""


class RemoteCacheError(EnvironmentProblem):
    """A remote cache server is unreachable, too slow, failing, or served a bad object.

    Builds turn it into a warning and build locally unless `--cache-strict` is given.
    """


class StepFailed(RfsError):
    """A build step ran and failed."""

    exit_code = EXIT_STEP_FAILED

    def __init__(
        self, step: str, message: str, output_tail: str = "", container: str | None = None
    ) -> None:
        self.step = step
        self.output_tail = output_tail
        self.container = container  # kept for inspection (rfs build --keep-failed)
        super().__init__(f"step {step} failed: {message}")


class StartFailed(StepFailed):
    """A step's container could not start (a missing executable, a bad user, a privilege the
    host refuses); `reason` is the runtime's message."""

    def __init__(self, step: str, reason: str) -> None:
        self.reason = reason
        super().__init__(step, f"could not start: {reason}")


class Interrupted(RfsError):
    """The build was interrupted by a signal."""

    exit_code = EXIT_INTERRUPTED


def report(exc: RfsError, stream: TextIO | None = None) -> None:
    """Word `exc` for a person, on `stream` (stderr): the one place errors are worded."""
    out = stream if stream is not None else sys.stderr
    print(f"rfs: error: {exc.message}", file=out)
    if isinstance(exc, ScriptError):
        for p in exc.problems:
            label = "warning" if p.severity == "warning" else "error"
            if str(p) not in exc.message:
                print(f"rfs: {label}: {p}", file=out)
    if exc.hint:
        print(f"rfs: hint: {exc.hint}", file=out)
