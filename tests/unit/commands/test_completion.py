"""`rfs completion`: the generated scripts complete verbs, options, choices and files in the
real shells (bash and fish directly, zsh through tmux: its completion needs a terminal)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from rfs.commands.completion import script_for
from tests.conftest import require_or_skip


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        require_or_skip(f"{tool} is not installed (scripts/setup-host.sh installs it)")
    assert path is not None
    return path


def bash_complete(script: Path, *words: str) -> list[str]:
    """What `rfs <words>` + Tab offers in bash (the last word is the one being completed)."""
    line = " ".join(f"'{w}'" for w in ("rfs", *words))
    code = (
        f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _rfs; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        [need("bash"), "--norc", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=script.parent,
    ).stdout
    return [w for w in out.splitlines() if w]


@pytest.fixture
def bash_script(tmp_path: Path) -> Path:
    path = tmp_path / "rfs.bash"
    path.write_text(script_for("bash"))
    (tmp_path / "pkg-dir").mkdir()
    return path


def test_bash_completes_verbs_options_choices_and_files(bash_script: Path) -> None:
    assert bash_complete(bash_script, "bu") == ["build"]
    assert set(bash_complete(bash_script, "")) >= {
        "build",
        "run",
        "plan",
        "check",
        "graph",
        "completion",
    }
    assert bash_complete(bash_script, "build", "--ke") == ["--keep-failed"]
    assert "--watch" in bash_complete(bash_script, "run", "--")  # an alias has the options
    assert "--explain" in bash_complete(bash_script, "plan", "--e")
    assert bash_complete(bash_script, "completion", "z") == ["zsh"]
    assert bash_complete(bash_script, "graph", "pkg", "--format", "") == ["dot", "svg", "png"]
    assert bash_complete(bash_script, "-l", "de") == ["debug"]
    assert bash_complete(bash_script, "build", "pkg-") == ["pkg-dir"]
    assert bash_complete(bash_script, "build", "pkg-dir", "-o", "rfs.b") == ["rfs.bash"]


def test_fish_completes_verbs_options_and_choices(tmp_path: Path) -> None:
    fish = need("fish")
    script = tmp_path / "rfs.fish"
    script.write_text(script_for("fish"))

    def complete(line: str) -> list[str]:
        out = subprocess.run(
            [fish, "--no-config", "-c", f"source {script}; complete -C '{line}'"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [row.split("\t")[0] for row in out.splitlines()]

    assert complete("rfs bu") == ["build"]
    assert complete("rfs build --ke") == ["--keep-failed"]
    assert complete("rfs completion ") == ["bash", "fish", "zsh"]
    assert complete("rfs graph x --format ") == ["dot", "png", "svg"]
    assert "build" not in complete("rfs build ")  # no second verb


def test_zsh_completes_in_a_terminal(tmp_path: Path) -> None:
    tmux, zsh = need("tmux"), need("zsh")
    script = tmp_path / "_rfs"
    script.write_text(script_for("zsh"))
    subprocess.run([zsh, "-n", str(script)], check=True)
    session = f"rfs-zsh-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [tmux, "new-session", "-d", "-s", session, "-x", "150", "-y", "20", f"{zsh} -f"], check=True
    )

    def keys(*k: str) -> None:
        subprocess.run([tmux, "send-keys", "-t", session, *k], check=True)

    def screen() -> str:
        return subprocess.run(
            [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
        ).stdout

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    try:
        keys(
            f"autoload -U compinit && compinit -u && source {script} && PS1='%% ' && echo READY",
            "Enter",
        )
        wait_for("READY\n%")  # the prompt (capture-pane drops trailing blanks)
        keys("rfs bu", "Tab")
        wait_for("% rfs build")
        keys(" --keep-f", "Tab")
        wait_for("% rfs build --keep-failed")
        keys("C-u", "rfs graph x --format ", "Tab")
        shown = wait_for("svg")
        assert "dot" in shown and "png" in shown
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], check=False)
