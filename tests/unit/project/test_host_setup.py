"""CI tests with the interpreter a Debian 12 user has: the venv setup-host.sh makes from Debian's
/usr/bin/python3, run by exactly the command README.md documents."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def readme_test_command() -> str:
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no Quick start commands"
    lines = block.group(1).splitlines()
    assert len(lines) == 2, lines  # one sets up and builds the example, one runs the tests
    return lines[1]


def test_ci_runs_exactly_the_readme_test_command_with_the_setup_venv() -> None:
    command = readme_test_command()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"phase tests {command} </dev/null" in ci.splitlines()
    setup = (ROOT / "scripts" / "setup-host.sh").read_text()
    venv = re.search(r"^VENV=\$\{RFS_VENV:-(.+)\}$", setup, re.M)
    assert venv and command.startswith(f"{venv.group(1)}/bin/python -m pytest ")
    assert re.search(r"^PYTHON=\$\{PYTHON:-/usr/bin/python3\}$", setup, re.M)


def test_requires_python_is_the_oldest_interpreter_ci_tests() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11.2"  # Debian 12's /usr/bin/python3


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks the CI run's interpreter")
def test_ci_tests_run_on_debians_own_python() -> None:
    debian = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert sys.version == debian
    assert sys.prefix == "/opt/rfs/venv" and sys.prefix != sys.base_prefix
