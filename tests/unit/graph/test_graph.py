"""Keys, the graph and the planner, on plain data: no engine, no files."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rfs.graph.compiler import build_graph, compile_steps
from rfs.graph.planner import Action, manifest, plan, plan_steps
from rfs.graph.steps import Facts, Step
from rfs.run.executors import interpreter_argv
from rfs.script.model import BuildScript
from rfs.script.schema import parse_script

SCRIPT = """
[filesystem]
size_mib = 64
[container]
image = { name = "busybox", tag = "1" }
[[commands]]
script_inline = "echo one"
[[commands]]
script_inline = "echo two"
[[commands]]
command = "echo three"
[[overlays]]
source_inline = "hello"
destination = "/etc/motd"
"""
FACTS = Facts(base_id="sha256:aaa", mkfs_version="mke2fs 1.47.2")


def script(text: str = SCRIPT) -> BuildScript:
    return parse_script(tomllib.loads(text))[0]


def keys(s: BuildScript, facts: Facts = FACTS) -> dict[str, str]:
    return {step.id: step.key for step in compile_steps(s, facts)}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a if a[k] != b[k]}


def test_same_inputs_same_keys() -> None:
    assert keys(script()) == keys(script())


def test_graph_shape() -> None:
    """An ext4 build with commands: each command's change is a DIFF step, chained."""
    steps = compile_steps(script(), FACTS)
    assert [s.id for s in steps] == [
        "base",
        "run[0]",
        "diff[0]",
        "run[1]",
        "diff[1]",
        "run[2]",
        "diff[2]",
        "overlays",
        "assemble",
    ]
    graph = build_graph(steps)
    assert sorted(graph.edges) == sorted(
        [
            ("base", "run[0]"),
            ("run[0]", "run[1]"),
            ("run[1]", "run[2]"),
            ("run[0]", "diff[0]"),
            ("base", "diff[0]"),
            ("run[1]", "diff[1]"),
            ("diff[0]", "diff[1]"),
            ("run[2]", "diff[2]"),
            ("diff[1]", "diff[2]"),
            ("diff[0]", "assemble"),
            ("diff[1]", "assemble"),
            ("diff[2]", "assemble"),
            ("overlays", "assemble"),
        ]
    )
    # a DIFF step's parents: its command, then the chain before it
    assert {s.id: s.parents for s in steps if s.id.startswith("diff")} == {
        "diff[0]": ("run[0]", "base"),
        "diff[1]": ("run[1]", "diff[0]"),
        "diff[2]": ("run[2]", "diff[1]"),
    }


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("size_mib = 64", 'size_mib = 64\ntype = "Squashfs"'),
        lambda t: t + '[[outputs]]\npath = "/boot/vmlinuz"\nto = "vmlinuz"\n',
    ],
    ids=["squashfs", "outputs"],
)
def test_graph_shape_of_an_unlayered_build(edit: Callable[[str], str]) -> None:
    """Other filesystem types and builds with side outputs read one export of the last layer."""
    graph = build_graph(compile_steps(script(edit(SCRIPT)), FACTS))
    assert sorted(graph.edges) == sorted(
        [
            ("base", "run[0]"),
            ("run[0]", "run[1]"),
            ("run[1]", "run[2]"),
            ("run[2]", "export"),
            ("export", "assemble"),
            ("overlays", "assemble"),
        ]
    )


def test_graph_shape_without_commands() -> None:
    bare = script(
        SCRIPT.split("[[commands]]")[0] + '[[overlays]]\nsource_inline = "x"\n'
        'destination = "/etc/motd"\n'
    )
    graph = build_graph(compile_steps(bare, FACTS))
    assert sorted(graph.edges) == [
        ("base", "export"),
        ("export", "assemble"),
        ("overlays", "assemble"),
    ]


def test_second_command_change_invalidates_it_and_downstream_only() -> None:
    edited = script(SCRIPT.replace("echo two", "echo TWO"))
    assert changed(keys(script()), keys(edited)) == {
        "run[1]",
        "diff[1]",
        "run[2]",
        "diff[2]",
        "assemble",
    }


def test_overlay_change_invalidates_overlays_and_assemble_only() -> None:
    edited = script(SCRIPT.replace('"hello"', '"bye"'))
    assert changed(keys(script()), keys(edited)) == {"overlays", "assemble"}


def test_base_id_change_invalidates_everything_but_overlays() -> None:
    other = dataclasses.replace(FACTS, base_id="sha256:bbb")
    assert changed(keys(script()), keys(script(), other)) == {
        "base",
        "run[0]",
        "diff[0]",
        "run[1]",
        "diff[1]",
        "run[2]",
        "diff[2]",
        "assemble",
    }


def test_tag_alone_is_not_part_of_the_key() -> None:
    retagged = script(SCRIPT.replace('tag = "1"', 'tag = "latest"'))
    assert keys(script()) == keys(retagged)


def test_size_change_only_reassembles() -> None:
    edited = script(SCRIPT.replace("size_mib = 64", "size_mib = 128"))
    assert changed(keys(script()), keys(edited)) == {"assemble"}


@given(st.text(min_size=1).filter(lambda t: t.strip() != ""))
def test_any_script_text_change_changes_the_key(text: str) -> None:
    base = script()
    edited = dataclasses.replace(
        base,
        commands=(dataclasses.replace(base.commands[0], script_inline=text), *base.commands[1:]),
    )
    same = text == base.commands[0].script_inline
    assert (keys(base)["run[0]"] == keys(edited)["run[0]"]) == same


def _plan(
    s: BuildScript, available: set[str], previous: Mapping[str, object] | None = None
) -> dict[str, tuple[Action, str]]:
    steps = compile_steps(s, FACTS)
    graph = build_graph(steps)

    def missing(step: Step) -> str | None:
        return None if step.id in available else "no cache entry"

    return {d.step.id: (d.action, d.reason) for d in plan(graph, missing, previous)}


def test_cached_image_needs_nothing_upstream() -> None:
    decisions = _plan(script(), {"assemble"})
    assert decisions["assemble"][0] is Action.CACHED
    assert {k for k, (a, _) in decisions.items() if a is Action.SKIP} == {
        "base",
        "run[0]",
        "diff[0]",
        "run[1]",
        "diff[1]",
        "run[2]",
        "diff[2]",
        "overlays",
    }


def test_resumes_from_deepest_cached_layer() -> None:
    decisions = _plan(script(), {"base", "run[0]", "diff[0]", "overlays"})
    actions = {k: a for k, (a, _) in decisions.items()}
    assert actions == {
        "base": Action.SKIP,
        "run[0]": Action.CACHED,
        "diff[0]": Action.CACHED,
        "run[1]": Action.RUN,
        "diff[1]": Action.RUN,
        "run[2]": Action.RUN,
        "diff[2]": Action.RUN,
        "overlays": Action.CACHED,
        "assemble": Action.RUN,
    }
    # without diff[0] its chain starts at the base, which is then needed
    decisions = _plan(script(), {"base", "run[0]", "overlays"})
    assert decisions["base"][0] is Action.CACHED and decisions["diff[0]"][0] is Action.RUN


def test_reasons_name_what_changed() -> None:
    old = {s.id: manifest(s) for s in compile_steps(script(), FACTS)}
    edited = script(SCRIPT.replace("echo two", "echo TWO"))
    decisions = _plan(edited, {"base", "run[0]", "overlays"}, old)
    assert decisions["run[1]"][0] is Action.RUN
    assert decisions["run[1]"][1].startswith("script changed")
    assert decisions["run[2]"][1].startswith("run[1] changed (script changed")
    assert _plan(script(), set(), {})["run[0]"][1] == "never built"
    same = {s.id: manifest(s) for s in compile_steps(script(), FACTS)}
    assert _plan(script(), set(), same)["run[0]"][1] == "no cache entry"


def test_never_built_is_said() -> None:
    old = {s.id: manifest(s) for s in compile_steps(script(), FACTS)}
    del old["run[2]"]
    assert _plan(script(), set(), old)["run[2]"][1] == "never built"


def test_interpreter_from_shebang() -> None:
    assert interpreter_argv(b"#!/bin/bash -eu\necho", "/s") == ["/bin/bash", "-eu", "/s"]
    assert interpreter_argv(b"#!/usr/bin/env python3\n", "/s") == ["/usr/bin/env", "python3", "/s"]
    assert interpreter_argv(b"echo hi\n", "/s") == ["/bin/sh", "/s"]


@pytest.mark.parametrize(
    "cached",
    [set(), {"assemble"}, {"export"}, {"run[0]", "overlays"}, {"run[1]", "export", "overlays"}],
)
def test_plan_over_the_step_list_matches_plan_over_the_graph(cached: set[str]) -> None:
    steps = compile_steps(script(), FACTS)
    graph = build_graph(steps)

    def available(step: Step) -> str | None:
        return None if step.id in cached else "no cache entry"

    old = {s.id: {"key": "0" * 64, "inputs": {}} for s in steps}
    assert plan_steps(steps, available, old) == plan(graph, available, old)
