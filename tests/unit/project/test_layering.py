"""Imports point one way. Every import in rfs/ (lazy ones inside functions and TYPE_CHECKING
ones included) goes from a module to one of a lower layer or of its own, and no two modules
import each other, directly or round about. The layers, top to bottom, are the ones
docs/architecture.md draws; a module not placed in one fails this test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).parents[3] / "rfs"

# Top to bottom. A module matches the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("rfs.cli", "rfs.__main__"),
    ("rfs.commands", "rfs.vm"),
    ("rfs.pipeline",),
    ("rfs.remote",),
    ("rfs.run",),
    ("rfs.report",),
    ("rfs.engine", "rfs.fs", "rfs.graph"),
    ("rfs.script",),
    ("rfs.host", "rfs.errors", "rfs"),
]

# The top level holds the entry and the error root only; everything else lives in a stage.
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "errors.py"}


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


def test_top_level_holds_only_the_entry_and_the_errors() -> None:
    files = {p.name for p in PACKAGE.glob("*.py")}
    assert files == TOP_LEVEL, f"move {sorted(files - TOP_LEVEL)} into a stage package"


def _declared_imports(package: Path) -> set[str] | None:
    """The packages a subpackage's docstring says it may import; None for "every package
    below it"."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert "May import" in doc, (
        f"{package.name}/__init__.py: the docstring must say what it may import"
    )
    allowed = doc[doc.index("May import") :].split(";")[0]
    if "every" in allowed:
        return None
    return set(re.findall(r"`(rfs(?:\.[a-z_]+)?)`", allowed))


def _package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir():
        return ".".join(parts[:2])
    return module


def test_each_stage_imports_only_what_its_docstring_declares() -> None:
    wrong = []
    for package in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        declared = _declared_imports(package)
        if declared is None:
            continue
        own = f"rfs.{package.name}"
        for a, b in import_graph().edges:
            target = _package_of(b)
            if _package_of(a) == own and target not in {own, "rfs"} and target not in declared:
                wrong.append(
                    f"{a} -> {b} (rfs/{package.name}/__init__.py declares {sorted(declared)})"
                )
    assert not wrong, "imports a package's docstring does not allow:\n" + "\n".join(sorted(wrong))


MAX_LINES = 500


def oversized(package: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Modules under `package` longer than `limit` lines: each should do one job."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found[str(path.relative_to(package))] = lines
    return found


def test_no_module_is_over_500_lines() -> None:
    assert oversized(PACKAGE) == {}, "split these modules by job"


def test_the_size_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert oversized(tmp_path) == {"long.py": MAX_LINES + 1}
