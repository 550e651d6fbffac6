"""Run rfs as a user does (`python -m rfs`, a process of its own), with a cache of the test's.

`Rfs` is the one way the tests run rfs: each runner has its own cache directory
(RFS_CACHE_DIR) and gives every process a run id of its own (RFS_RUN_ID, the value of each
container's `org.rfs.run` label), remembered in `run_ids` so a test can check that no container
of its runs is left. A runner can also have a private $TMPDIR, environment overrides (and
variables it removes), a working directory and a timeout. `start` gives a running process (for
tests that signal rfs or watch it work) whose output is read as it comes. `IsolatedRfs` adds
the checks of the fault tests: what a run leaves behind. `rfs(*args, cache=…)` is the short
form for a single run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import pytest

DOCKER_URI = os.environ.get("RFS_TEST_ENGINE_URI") or "unix:///var/run/docker.sock"
# The caches of every IsolatedRfs: their layer images are removed from the engine at the end
# (by the `api` fixture of tests/integration/conftest.py).
LAYER_CACHES: list[Path] = []


class Ran(Protocol):
    """A finished rfs process as the tests read it: its stderr, the steps it ran."""

    err: str

    def ran(self) -> list[str]: ...


def besides_overlays(run: Ran, before: Ran | None = None) -> list[str]:
    """The steps `run` ran but the overlays, which run beside the commands (-j: by default the
    cores), so their place in the order varies. They must have run in `run`, or, after a build
    that failed or was stopped (`before`), in one of the two: once in all."""
    if before is None:
        assert "overlays" in run.ran(), run.err
    else:
        assert ("overlays" in run.ran()) != ("overlays" in before.ran()), (run.err, before.err)
    return [step for step in run.ran() if step != "overlays"]


@dataclass
class Run:
    """What one rfs process did."""

    code: int
    out: str
    err: str
    run_id: str = ""
    seconds: float = 0.0

    def ran(self) -> list[str]:
        """Step ids rfs reports as run (done), in order."""
        return [
            line.split()[1] for line in self.err.splitlines() if line.strip().startswith("done ")
        ]

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


class Running:
    """An rfs process; its stdout and stderr are read by threads as they come."""

    def __init__(self, proc: subprocess.Popen[str], run_id: str, *, group: bool = True) -> None:
        self.proc = proc
        self.run_id = run_id
        self.group = group  # rfs leads a process group of its own
        self.started = time.monotonic()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((proc.stdout, self.out), (proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], into: list[str]) -> None:
        for line in iter(stream.readline, ""):
            into.append(line)

    def wait_for(self, when: Callable[[str], bool], timeout: float = 120) -> None:
        """Return once `when(stderr so far)` is true; fail if rfs ends first."""
        deadline = time.monotonic() + timeout
        while not when("".join(self.err)):
            if self.proc.poll() is not None:
                pytest.fail(f"rfs ended before it was expected to:\n{self.finish().err}")
            assert time.monotonic() < deadline, "".join(self.err)
            time.sleep(0.005)

    def lines(self, text: str) -> int:
        """How many lines of stderr so far contain `text`."""
        return sum(text in line for line in self.err)

    def kill(self) -> None:
        """SIGKILL to rfs (and its process group, if it has one); then reap it."""
        if self.proc.poll() is None:
            if self.group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait()

    def finish(self, timeout: float = 300) -> Run:
        """Wait for rfs to end (killing its process group after `timeout`) and collect it."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for reader in self._readers:
            reader.join(timeout=10)
        return Run(
            self.proc.returncode,
            "".join(self.out),
            "".join(self.err),
            self.run_id,
            time.monotonic() - self.started,
        )


class Rfs:
    """The `rfs` command with its own cache (and, if given, $TMPDIR, environment, directory)."""

    def __init__(
        self,
        cache: Path,
        *,
        tmpdir: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 300,
        unset: tuple[str, ...] = (),
        run_id_prefix: str = "",
    ) -> None:
        self.cache = cache
        self.tmpdir = tmpdir
        if tmpdir is not None:
            tmpdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.unset = unset  # variables removed from the environment rfs runs in
        self.run_id_prefix = run_id_prefix
        self.run_ids: list[str] = []

    def new_run_id(self) -> str:
        run_id = f"{self.run_id_prefix}{uuid.uuid4().hex}"
        self.run_ids.append(run_id)
        return run_id

    def environ(self, run_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of one rfs process."""
        env = {**os.environ}
        if self.tmpdir is not None:
            env["TMPDIR"] = str(self.tmpdir)
        env.update({"RFS_CACHE_DIR": str(self.cache), "RFS_RUN_ID": run_id, **self.env})
        for name in self.unset:
            env.pop(name, None)
        env.update(extra or {})
        return env

    def __call__(
        self,
        *args: str | Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float | None = None,
    ) -> Run:
        """Run `rfs ARGS…` to its end."""
        run_id = self.new_run_id()
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "rfs", *map(str, args)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s or self.timeout_s,
            stdin=subprocess.DEVNULL,
            cwd=cwd or self.cwd,
            env=self.environ(run_id, env),
        )
        return Run(proc.returncode, proc.stdout, proc.stderr, run_id, time.monotonic() - t0)

    def start(
        self,
        *args: str | Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = True,
    ) -> Running:
        """Start rfs, by default in its own session (so a signal can go to its whole process
        group, as Ctrl-C in a terminal does); its output is collected as it comes."""
        run_id = self.new_run_id()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rfs", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd or self.cwd,
            env=self.environ(run_id, env),
            start_new_session=new_session,
        )
        return Running(proc, run_id, group=new_session)

    def interrupt(
        self,
        args: list[str | Path],
        when: Callable[[str], bool],
        sig: int,
        *,
        group: bool,
        timeout: float = 120,
    ) -> Run:
        """Run rfs and send `sig` once `when(stderr so far)` is true: to the process group
        (Ctrl-C in a terminal) or to rfs alone (`kill`); signal 0 sends nothing."""
        running = self.start(*args)
        running.wait_for(when, timeout)
        if sig and group:
            os.killpg(running.proc.pid, sig)
        elif sig:
            os.kill(running.proc.pid, sig)
        return running.finish()


def containers_of(client: Any, run_id: str) -> list[Any]:
    """The containers (any state) of one rfs run, through a docker SDK or API client."""
    label = {"label": f"org.rfs.run={run_id}"}
    if hasattr(client, "containers") and hasattr(client.containers, "list"):
        return list(client.containers.list(all=True, filters=label))
    return list(client.containers(all=True, filters=label))


def count_created(client: Any, run_id: str, start_ns: int) -> int:
    """The containers the engine created for one rfs run since `start_ns` (time.time_ns()),
    from the engine's events (independently of what rfs reports); `client` is a docker SDK
    client."""

    def read() -> int:
        events = client.events(
            since=start_ns // 10**9 - 1,
            until=int(time.time()) + 1,
            decode=True,
            filters={"type": "container", "event": "create", "label": f"org.rfs.run={run_id}"},
        )
        return sum(1 for e in events if int(e["timeNano"]) >= start_ns)

    # Podman writes its events log apart from the API's answer: an event can show up a moment
    # after the container exists. The count is taken once two reads a moment apart agree.
    count = read()
    for _ in range(20):
        time.sleep(0.25)
        again = read()
        if again == count:
            return count
        count = again
    return count


def identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or written: inode, size, mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class IsolatedRfs(Rfs):
    """rfs with a private $TMPDIR and cache under `base`, on Docker through `api` (a docker
    APIClient); checks what each run leaves."""

    def __init__(self, base: Path, api: Any, engine_uri: str = DOCKER_URI) -> None:
        super().__init__(
            base / "cache",
            tmpdir=base / "tmp",
            env={"DOCKER_HOST": engine_uri},
            unset=("CI",),  # no behaviour of rfs depends on it; keep the display plain
            run_id_prefix="fault-",
        )
        self.tmpdir: Path = base / "tmp"  # always set here
        self.base = base
        self.api = api
        self.engine_uri = engine_uri
        LAYER_CACHES.append(self.cache)

    def run(self, *args: str | Path, extra_env: dict[str, str] | None = None) -> Run:
        return self.start(*args, env=extra_env).finish()

    def containers(self, run_id: str) -> list[dict[str, Any]]:
        return containers_of(self.api, run_id)

    def assert_clean(
        self, result: Run, output: Path, previous: tuple[int, int, int] | None
    ) -> None:
        """Nothing of the run is left, and the output is the previous image (or none)."""
        assert "Traceback" not in result.err, result.err
        assert self.containers(result.run_id) == [], "containers left behind"
        assert sorted(os.listdir(self.tmpdir)) == [], "temporary files left in $TMPDIR"
        tmp = self.cache / "tmp"
        assert not tmp.exists() or sorted(os.listdir(tmp)) == [], "partial cache writes left"
        assert list(output.parent.glob(f".{output.name}.rfs-*")) == [], "temporary image left"
        assert identity(output) == previous, "the output changed"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(self.base) not in mounts.replace(str(self.base / "mnt"), ""), mounts


def rfs(
    *args: str | Path, cache: Path, env: dict[str, str] | None = None, timeout_s: float = 300
) -> Run:
    """Run `rfs ARGS…` with `cache` as its cache directory and a run id of its own."""
    return Rfs(cache, timeout_s=timeout_s)(*args, env=env)


def steps_run(plan_out: str) -> set[str]:
    """The step ids an `rfs plan` listing says will run."""
    return {line.split()[1] for line in plan_out.splitlines() if line.startswith("run ")}
