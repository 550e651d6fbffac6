"""The unit tests alone cover at least 80% of rfs/, with no container engine reachable.

The unit suite (less this module) runs again in a subprocess under coverage.py (pytest-cov).
No engine can be reached there: DOCKER_HOST, CONTAINER_HOST and XDG_RUNTIME_DIR name places
that do not exist, and, where the test can (root with `unshare`, as in CI), the engines'
well-known sockets (Podman's rootful one is not configurable) are covered by /dev/null in a
mount namespace of the subprocess's own, so a unit test that needed an engine would fail.
The TOTAL line is recorded as a user property, which tests/conftest.py prints in the terminal
summary of every run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MINIMUM = 80
INNER = "RFS_UNIT_COVERAGE_INNER"  # set in the subprocess: never run this test there
SOCKETS = ("/run/podman/podman.sock", "/run/docker.sock", "/var/run/docker.sock")
# Hides each engine socket that exists, then runs the rest of the command line.
HIDE = 'for s in "$@"; do [ "$s" = -- ] && break; [ -S "$s" ] && mount --bind /dev/null "$s"; '
HIDE += 'shift; done; shift; exec "$@"'


def _can_hide_sockets() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def total_percent(report: str) -> tuple[str, int]:
    """The TOTAL line of a coverage report and its percentage."""
    match = re.search(r"^TOTAL\s.*?(\d+)%\s*$", report, re.MULTILINE)
    assert match, f"no TOTAL line in the coverage report:\n{report[-3000:]}"
    return " ".join(match.group(0).split()), int(match.group(1))


def test_total_percent_reads_the_total_line() -> None:
    report = "rfs/cli.py   30   9   70%\nTOTAL   9061   2343   74%\n"
    assert total_percent(report) == ("TOTAL 9061 2343 74%", 74)


@pytest.mark.skipif(bool(os.environ.get(INNER)), reason="the measured run itself")
def test_unit_tests_cover_80_percent_of_rfs_without_an_engine(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    env = {
        **os.environ,
        INNER: "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
        "CONTAINER_HOST": f"unix://{tmp_path}/no-podman.sock",
        "XDG_RUNTIME_DIR": str(tmp_path / "no-runtime-dir"),
        "COVERAGE_FILE": str(tmp_path / ".coverage"),
    }
    env.pop("RFS_TEST_ENGINE_URI", None)
    pytest_argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--rootdir={ROOT}",
        str(ROOT / "tests" / "unit"),
        f"--ignore={Path(__file__).resolve()}",
        "--cov=rfs",
        "--cov-report=term",
    ]
    hidden = _can_hide_sockets()
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, "hide"]
    argv = [*unshare, *SOCKETS, "--", *pytest_argv] if hidden else pytest_argv
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    # A unit test failing there fails in this run too: only the coverage is judged here.
    line, percent = total_percent(done.stdout)
    where = "engine sockets hidden" if hidden else "engine sockets not hidden (not root)"
    record_property("unit coverage", f"unit coverage of rfs/ (no engine, {where}): {line}")
    assert percent >= MINIMUM, (
        f"the unit tests cover {percent}% of rfs/, below {MINIMUM}%:\n{done.stdout[-8000:]}"
    )
