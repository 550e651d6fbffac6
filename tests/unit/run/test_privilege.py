"""Telling a privilege the host refuses from a command that cannot start (rfs.run.checks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from rfs.run.checks import privilege_field, privilege_refusal
from rfs.script.schema import parse_script

CAPS = "unable to start container process: unable to apply caps: operation not permitted"
NOT_FOUND = 'exec: "true": executable file not found in $PATH'


class Probes:
    """An engine whose containers start or not as told; records every probe."""

    def __init__(self, privileged: str | None, unprivileged: str | None) -> None:
        self.answers = {True: privileged, False: unprivileged}
        self.calls: list[tuple[str, tuple[str, ...], bool, dict[str, str]]] = []

    def probe_start(
        self, image: str, argv: Sequence[str], *, privileged: bool, labels: Mapping[str, str]
    ) -> str | None:
        self.calls.append((image, tuple(argv), privileged, dict(labels)))
        return self.answers[privileged]


@pytest.mark.parametrize(
    ("privileged", "unprivileged", "found", "probes"),
    [
        (None, None, None, 1),  # privileged containers start: one probe, nothing to say
        (CAPS, None, CAPS, 2),  # only privilege fails: the host refuses it
        (NOT_FOUND, NOT_FOUND, None, 2),  # both fail alike: not privilege's doing
    ],
)
def test_refusal_is_claimed_only_when_privilege_alone_fails(
    privileged: str | None, unprivileged: str | None, found: str | None, probes: int
) -> None:
    engine = Probes(privileged, unprivileged)
    assert privilege_refusal(cast(Any, engine), "sha256:abc", {"org.rfs.run": "r"}) == found
    assert [c[2] for c in engine.calls] == [True, False][:probes]
    assert all(c[0] == "sha256:abc" and c[3] == {"org.rfs.run": "r"} for c in engine.calls)


def test_the_field_asking_for_privilege() -> None:
    head = {"container": {"image": {"name": "a", "tag": "b"}}}
    commands = [{"command": "true"}, {"command": "true", "privileged": True}]
    assert privilege_field(parse_script(head)[0]) is None
    assert privilege_field(parse_script({**head, "commands": commands})[0]) == (
        "commands[1].privileged"
    )
    rootful = {"container": {**head["container"], "rootful": True}, "commands": commands}
    assert privilege_field(parse_script(rootful)[0]) == "container.rootful"
