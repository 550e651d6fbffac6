"""Run rfs as a user does (`python -m rfs`, a process of its own), with a cache of the test's."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    """What one rfs process did."""

    code: int
    out: str
    err: str


def rfs(
    *args: str | Path, cache: Path, env: dict[str, str] | None = None, timeout_s: float = 300
) -> Run:
    """Run `rfs ARGS…` with `cache` as its cache directory and a run id of its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "rfs", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        env={
            **os.environ,
            "RFS_CACHE_DIR": str(cache),
            "RFS_RUN_ID": uuid.uuid4().hex,
            **(env or {}),
        },
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def steps_run(plan_out: str) -> set[str]:
    """The step ids an `rfs plan` listing says will run."""
    return {line.split()[1] for line in plan_out.splitlines() if line.startswith("run ")}
