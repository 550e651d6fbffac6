"""Imports point one way. Every import in rfs/ (lazy ones inside functions and TYPE_CHECKING
ones included) goes from a module to one of a lower layer or of its own, and no two modules
import each other, directly or round about. The layers, top to bottom, are the ones
docs/architecture.md draws; a module not placed in one fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).parents[2] / "rfs"

# Top to bottom. A module matches the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("rfs.cli", "rfs.__main__"),
    ("rfs.commands", "rfs.watch", "rfs.display", "rfs.progress", "rfs.events", "rfs.boot"),
    ("rfs.build",),
    ("rfs.remote", "rfs.executors", "rfs.basefacts", "rfs.checks", "rfs.explain", "rfs.reporter"),
    (
        "rfs.engine",
        "rfs.fs",
        "rfs.planner",
        "rfs.compiler",
        "rfs.inputs",
        "rfs.snapshot",
        "rfs.store",
        "rfs.package",
        "rfs.packing",
        "rfs.archive",
        "rfs.basearchive",
        "rfs.document",
        "rfs.schema",
        "rfs.schema_recipes",
        "rfs.schema_reader",
        "rfs.codeversion",
        "rfs.etcfiles",
        "rfs.copyin",
        "rfs.baseimages",
    ),
    (
        "rfs.errors",
        "rfs.hashing",
        "rfs.sparse",
        "rfs.proc",
        "rfs.childio",
        "rfs.signals",
        "rfs.locks",
        "rfs.orphans",
        "rfs.steps",
        "rfs.model",
        "rfs",
    ),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                # a package's own submodules may import the package (its __init__)
                if target in mods and target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    return graph


def layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        pytest.fail(f"{module} is in no layer: place it in LAYERS and docs/architecture.md")
    return rank


def test_no_import_cycles() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_point_down() -> None:
    wrong = sorted(f"{a} -> {b}" for a, b in import_graph().edges if layer(a) > layer(b))
    assert not wrong, "imports against the layering (upwards):\n" + "\n".join(wrong)


def test_the_checks_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("rfs.errors", "rfs.cli")
    assert layer("rfs.errors") > layer("rfs.cli")
    graph.add_edge("rfs.cli", "rfs.errors")
    assert list(nx.simple_cycles(graph))
