"""The one subprocess wrapper: argv lists only, a fixed environment, stderr kept for errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Collection, Mapping, Sequence
from typing import IO

from rfs.errors import EnvironmentProblem, RfsError
from rfs.host import signals

log = logging.getLogger("rfs.host.proc")

# A pinned locale: mke2fs's tar reader fails on non-ASCII PAX paths without a UTF-8 locale,
# and tool messages we parse must not be translated.
_BASE_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def tool_path(name: str) -> str:
    """Return the absolute path of an external tool, searching sbin too, or raise."""
    search = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(name, path=search)
    if found is None:
        raise EnvironmentProblem(
            f"required tool {name!r} is not installed",
            hint=f"install the package that provides {name}",
        )
    return found


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    env.update(_BASE_ENV)
    if extra:
        env.update(extra)
    return env


def _tail(data: bytes, lines: int = 15) -> str:
    text = data.decode("utf-8", "replace").strip()
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | int | None = None,
    input_bytes: bytes | None = None,
    what: str | None = None,
    shielded: bool = False,
    accept: Collection[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv`, capture its output, and raise RfsError naming `what` on an exit code not
    in `accept`.

    `shielded`: for a tool that must never stop half-way (it writes a file in place): it runs
    in its own session, so a Ctrl-C to the terminal's process group does not reach it, and
    SIGINT/SIGTERM are held back until it has ended (then handled as usual).
    """
    log.debug("+ %s", shlex.join(argv))
    try:
        with signals.deferred() if shielded else contextlib.nullcontext():
            proc = subprocess.run(
                list(argv),
                env=_env(env),
                stdin=stdin if input_bytes is None else None,
                input=input_bytes,
                capture_output=True,
                check=False,
                start_new_session=shielded,
            )
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"required tool {argv[0]!r} is not installed") from exc
    if proc.returncode not in accept:
        label = what or os.path.basename(argv[0])
        raise RfsError(f"{label} failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    return proc


def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.PIPE,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stderr captured (unless `stderr` says otherwise); the caller feeds it
    and calls `finish`."""
    log.debug("+ %s", shlex.join(argv))
    try:
        return subprocess.Popen(
            list(argv), env=_env(env), stdin=stdin, stdout=stdout, stderr=stderr
        )
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"required tool {argv[0]!r} is not installed") from exc


def finish(proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait for a process started by `popen` and raise with its stderr tail on failure."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RfsError(f"{what} failed (exit {proc.returncode}): {_tail(err or b'')}")
