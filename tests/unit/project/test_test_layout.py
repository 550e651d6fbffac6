"""The layout of the tests themselves: a test module imports shared helpers (tests/*.py, not
named test_*), never another test module, and no two test modules share a basename."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TESTS = REPO / "tests"


def imported_test_modules(source: str) -> list[str]:
    """The test modules (a dotted name with a `test_*` part) that `source` imports."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            within = base if base.endswith(".") else f"{base}."
            # `from tests.unit import test_x` imports the module tests.unit.test_x
            names = [base, *(f"{within}{alias.name}" for alias in node.names)]
        found += [
            name
            for name in names
            if any(part.startswith("test_") for part in name.lstrip(".").split("."))
        ]
    return found


def python_files() -> list[Path]:
    return sorted([*TESTS.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])


def test_no_module_imports_a_test_module() -> None:
    offenders = {
        str(path.relative_to(REPO)): imported
        for path in python_files()
        if (imported := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move what they share into a helper module under tests/"


def test_the_check_catches_every_form_of_import() -> None:
    # spelled in parts, so that a grep for such imports over tests/ finds none here
    integration, unit = "tests.integration", "tests.unit"
    caught = [
        f"from {integration}.test_faults import Rfs",
        "from tests.unit import test_reporter",
        "import tests.integration.test_fs_types as fs",
        "from .test_build_fidelity import SCRIPT",
        "from . import test_build_fidelity",
        f"def f():\n    from {unit}.test_reporter import validate_events\n",
    ]
    for source in caught:
        assert imported_test_modules(source), source
    allowed = [
        "from tests.rfsrun import rfs",
        "from tests.packages import write_package",
        "import pytest",
        "from rfs.graph.steps import Step",
        "from . import conftest",
    ]
    for source in allowed:
        assert imported_test_modules(source) == [], source


def test_test_modules_have_distinct_basenames() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_shared_helpers_are_not_test_modules() -> None:
    """Shared helpers sit at tests/ top level; test modules only in tests/unit/<dir>/ and
    tests/integration."""
    assert list(TESTS.glob("test_*.py")) == []
    misplaced = [
        str(path.relative_to(REPO))
        for path in TESTS.rglob("test_*.py")
        if path.parent.relative_to(TESTS).parts[:1] not in (("unit",), ("integration",))
    ]
    assert misplaced == []


PROJECT_WIDE = "project"  # tests/unit/project/: checks over the whole repository


def misplaced_unit_tests(unit: Path, packages: set[str]) -> list[str]:
    """The unit test modules under `unit` that do not sit directly in tests/unit/<package>/
    for a package of rfs in `packages`, or in tests/unit/project/."""
    allowed = {*packages, PROJECT_WIDE}
    return sorted(
        str(path.relative_to(unit))
        for path in unit.rglob("test_*.py")
        if len(path.relative_to(unit).parts) != 2 or path.parent.name not in allowed
    )


def rfs_packages() -> set[str]:
    """The subpackages of rfs/ (directories with an __init__.py)."""
    return {init.parent.name for init in (REPO / "rfs").glob("*/__init__.py")}


def test_unit_tests_mirror_the_packages_of_rfs() -> None:
    """tests/unit/ mirrors rfs/: each unit test module sits in the directory named after the
    rfs package it tests, or in tests/unit/project/ for project-wide checks."""
    assert misplaced_unit_tests(TESTS / "unit", rfs_packages()) == []


def test_the_mirror_check_catches_a_misplaced_module(tmp_path: Path) -> None:
    for relative in (
        "graph/test_ok.py",
        "project/test_ok2.py",
        "test_flat.py",
        "nosuchpackage/test_x.py",
        "graph/deeper/test_y.py",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    assert misplaced_unit_tests(tmp_path, {"graph", "fs"}) == [
        "graph/deeper/test_y.py",
        "nosuchpackage/test_x.py",
        "test_flat.py",
    ]
    assert "graph" in rfs_packages() and "unit" not in rfs_packages()
