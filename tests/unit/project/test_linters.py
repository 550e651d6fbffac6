"""The linters the project promises, run as tests (as mkosi does), so CI enforces them:
`ruff check` and `ruff format --check` over the tree and `mypy --strict` over rfs/, tests/ and
benchmarks/ (settings in pyproject.toml), with the interpreter running the tests (the venv CI
uses has both from the dev extras)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]


def _tool(module: str) -> list[str]:
    found = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, check=False
    )
    if found.returncode != 0:
        pytest.fail(f"{module} is not installed for {sys.executable}: pip install -e '.[dev]'")
    return [sys.executable, "-m", module]


def test_ruff_check_is_clean() -> None:
    done = subprocess.run(
        [*_tool("ruff"), "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_the_tree_as_it_is() -> None:
    done = subprocess.run(
        [*_tool("ruff"), "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout + done.stderr


def test_mypy_strict_is_clean_on_rfs_tests_and_benchmarks(tmp_path: Path) -> None:
    # A cache of its own: a stale shared cache must not hide an error, nor this run's
    # cache land in the checkout. One run: the tests import rfs, so it is checked anyway.
    done = subprocess.run(
        [*_tool("mypy"), "--strict", "--cache-dir", str(tmp_path), "rfs", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
