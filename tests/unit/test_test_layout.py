"""The layout of the tests themselves: a test module imports shared helpers (tests/*.py, not
named test_*), never another test module, and no two test modules share a basename."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
    """Shared helpers sit at tests/ top level; test modules only in tests/unit and
    tests/integration."""
    assert list(TESTS.glob("test_*.py")) == []
