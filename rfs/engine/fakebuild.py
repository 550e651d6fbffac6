"""The Dockerfile subset the fake engine builds (`FakeEngine.build_image`), parsed here.

FROM (an image or an earlier stage, `AS name`), ARG (global before the first FROM, or per
stage; `build_args` win over defaults), ENV, WORKDIR, USER, COPY (`--from=stage`) and RUN
(handed to the fake's command stand-in as `/bin/sh -c …`), with `$NAME`/`${NAME}` expanded
from the args and env in scope, as the real builders do. Anything else is refused, so a test
never believes the fake built what it cannot.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
KNOWN = frozenset({"FROM", "ARG", "ENV", "WORKDIR", "USER", "COPY", "RUN"})


class DockerfileError(ValueError):
    """An instruction the fake cannot build; `line` is its text."""

    def __init__(self, line: str, message: str) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Instruction:
    """One instruction of a stage, its variables expanded."""

    op: str
    args: tuple[str, ...]
    line: str  # as written, for messages


@dataclass
class Stage:
    """One FROM and what follows it."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def _expand(text: str, scope: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: scope.get(m.group(1) or m.group(2), ""), text)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _pairs(rest: str) -> list[tuple[str, str]]:
    """`ENV a=1 b=2` or `ENV a 1`; `ARG a=1` or `ARG a`."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(w.split("=", 1)[0], w.split("=", 1)[1] if "=" in w else "") for w in words]


def parse(text: str, build_args: Mapping[str, str], target: str | None) -> list[Stage]:
    """The stages up to `target` (all of them without one)."""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    scope: dict[str, str] = {}
    for line in _logical_lines(text):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op not in KNOWN:
            raise DockerfileError(line, f"the fake engine does not build {op}")
        if op == "FROM":
            words = _expand(rest, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            scope = {}
            continue
        if op == "ARG":
            for key, default in _pairs(rest):
                value = build_args.get(key, global_args.get(key, default))
                (global_args if not stages else scope)[key] = value
            continue
        if not stages:
            raise DockerfileError(line, "an instruction before the first FROM")
        if op == "ENV":
            pairs = [(k, _expand(v, scope)) for k, v in _pairs(rest)]
            scope.update(pairs)
            stages[-1].instructions.append(
                Instruction(op, tuple(f"{k}={v}" for k, v in pairs), line)
            )
            continue
        if op == "RUN":  # the shell expands; hand it the args and env in scope
            args: tuple[str, ...] = (rest, *(f"{k}={v}" for k, v in scope.items()))
        else:
            args = tuple(shlex.split(_expand(rest, scope)))
        stages[-1].instructions.append(Instruction(op, args, line))
    if target is not None:
        names = [s.name for s in stages]
        if target not in names:
            raise DockerfileError(f"--target {target}", f"no stage named {target}")
        stages = stages[: names.index(target) + 1]
    return stages
