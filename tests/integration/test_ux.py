"""What a person and a machine see, end to end on the real Docker engine: plain CI output with
the summary and the time the cache saved, JSON events valid against docs/events.schema.json,
`plan --explain`, `rfs graph` drawn to PNG, `--watch`, `--keep-failed` with the printed shell
command actually run, and the live display in a real terminal (tmux)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.constants import BUSYBOX
from tests.events import validate_events
from tests.fsinspect import list_ext4, read_ext4_file
from tests.packages import write_package
from tests.rfsrun import Rfs, Run

pytestmark = pytest.mark.integration


BUILD_TOML = """
[filesystem]
size_mib = 16

[container]
image = { name = "IMAGE_NAME", tag = "IMAGE_TAG" }

[[commands]]
script_inline = '''
#!/bin/sh
mkdir -p /srv
echo hello from the first command
echo TOKEN > /srv/token
'''

[[commands]]
script_path = "/scripts/two.sh"

[[commands]]
command = "touch /srv/three"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"

[[overlays]]
source_inline = "nameserver 192.0.2.1\\n"
destination = "/etc/resolv.conf"
"""
TWO_SH = "#!/bin/sh\necho two\necho two > /srv/two\nexit 0\n"


def rfs(*args: str | Path, cache: Path, check: bool = True) -> Run:
    """Run the rfs command with its output piped (not a terminal: CI mode)."""
    done = Rfs(cache)(*args)
    if check:
        assert done.code == 0, done.err
    return done


def make_package(root: Path, image: str = BUSYBOX, token: str = "t") -> Path:
    name, tag = image.rsplit(":", 1)
    return write_package(
        root,
        BUILD_TOML.replace("IMAGE_NAME", name).replace("IMAGE_TAG", tag).replace("TOKEN", token),
        {"scripts/two.sh": TWO_SH, "files/motd": "welcome\n"},
    )


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> Path:
    """A cache in which the package's layers and export are built (once per module)."""
    root = tmp_path_factory.mktemp("warm")
    cache = root / "cache"
    rfs("build", make_package(root / "pkg"), "-o", root / "out.ext4", "--no-network", cache=cache)
    return cache


@pytest.fixture
def cache(warm_cache: Path, tmp_path: Path) -> Path:
    """A copy of the warm cache, so each test starts from the same state."""
    copy = tmp_path / "cache"
    shutil.copytree(warm_cache, copy)
    return copy


def content(image: Path, path: str) -> bytes:
    return read_ext4_file(image, list_ext4(image)[path].inode)


# --- CI output and JSON --------------------------------------------------------------------


def test_plain_output_summary_and_json_events(tmp_path: Path, docker_client: Any) -> None:
    pkg = make_package(tmp_path / "pkg", token=uuid.uuid4().hex)  # new keys: a cold build
    out, cache = tmp_path / "out.ext4", tmp_path / "cache"
    first = rfs("build", pkg, "-o", out, "--no-network", "--json", cache=cache)
    events = [json.loads(line) for line in first.out.splitlines()]  # stdout: only JSON lines
    validate_events(events)
    steps = ["run[0]", "diff[0]", "run[1]", "diff[1]", "run[2]", "diff[2]", "overlays", "assemble"]
    finished = [e["step"] for e in events if e["event"] == "step_finished"]
    assert first.ran() == finished  # the display's order: the order the steps finished in
    assert sorted(finished) == sorted(steps)
    assert finished.index("overlays") < finished.index("assemble")
    outputs = [e["text"] for e in events if e["event"] == "step_output"]
    assert "hello from the first command" in outputs
    diff = next(e for e in events if e["event"] == "step_finished" and e["step"] == "diff[2]")
    assert 0 < diff["bytes"] < 100_000 and len(diff["key"]) == 64  # a change, not an export
    # the base image's export (what the diffs are laid on) shows progress against its size
    progress = [e for e in events if e["event"] == "step_progress" and e["step"] == "diff[0]"]
    assert progress, events
    for event in progress:
        assert 0 < event["bytes"] < 1.2 * event["total_bytes"], event
    last = events[-1]
    assert (last["event"], last["ok"], last["output"], last["ran"]) == (
        "build_finished",
        True,
        str(out),
        8,
    )
    # the person's display went to stderr, in the plain CI format
    err = first.err.splitlines()
    assert "  run[0] | hello from the first command" in err
    assert sorted(ln.split()[1] for ln in err if ln.startswith("  done ")) == sorted(steps)
    header = next(
        i for i, ln in enumerate(err) if ln.split()[:4] == ["step", "result", "time", "size"]
    )
    rows = [ln.split() for ln in err[header + 1 : -1]]
    assert [r[:2] for r in rows] == [["base", "cached"]] + [[step, "ran"] for step in steps]
    assert err[-1].startswith("8 step(s) ran, 1 cached")

    # an overlay edit: two steps run, the others are reused and their recorded time is saved
    (pkg / "files" / "motd").write_text("edited\n")
    second = rfs("build", pkg, "-o", out, "--no-network", "-q", cache=cache)
    assert second.out == f"{out}\n"
    lines = second.err.splitlines()
    assert " | " not in second.err  # -q
    assert [ln.split()[1] for ln in lines if ln.startswith("  done ")] == ["overlays", "assemble"]
    saved = re.search(r"the cache saved (\d+\.\d+) s$", lines[-1])
    assert saved is not None and float(saved.group(1)) > 0.3, lines[-1]
    reused = [ln.split() for ln in lines if ln.split()[:1] == ["run[0]"]]
    assert reused and reused[-1][1] == "skipped" and reused[-1][2].startswith("(")
    assert content(out, "/etc/motd") == b"edited\n"


# --- plan --explain -----------------------------------------------------------------------


def _derived_image(client: Any, tag: str) -> str:
    """A copy of BUSYBOX with one more file, committed as `tag`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/derived")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"v2"))
    container = client.containers.create(
        BUSYBOX, command=["/bin/true"], labels={"org.rfs.test": "1"}
    )
    try:
        container.put_archive("/", buf.getvalue())
        container.commit(*tag.rsplit(":", 1))
    finally:
        container.remove(force=True)
    return tag


def test_plan_explain_names_lines_destinations_and_moved_tags(
    tmp_path: Path, cache: Path, docker_client: Any
) -> None:
    moving = f"rfs-test-tmp/ux-{uuid.uuid4().hex[:8]}:moving"
    other = f"rfs-test-tmp/ux-{uuid.uuid4().hex[:8]}:other"
    docker_client.images.get(BUSYBOX).tag(*moving.rsplit(":", 1))
    try:
        pkg = make_package(tmp_path / "pkg", image=moving)
        out = tmp_path / "out.ext4"
        first = rfs("plan", pkg, "-o", out, "--no-network", "--explain", cache=cache)
        assert "- assemble: never built (no earlier build of this script)" in first.out
        rfs("build", pkg, "-o", out, "--no-network", cache=cache)
        again = rfs("plan", pkg, "-o", out, "--no-network", "--explain", cache=cache)
        assert "nothing to do" in again.out

        (pkg / "scripts" / "two.sh").write_text(TWO_SH.replace("> /srv/two", "> /srv/TWO"))
        (pkg / "build.toml").write_text(
            (pkg / "build.toml").read_text().replace("192.0.2.1", "192.0.2.53")
            + '[[commands]]\ncommand = "true"\n'
        )
        plan = rfs("plan", pkg, "-o", out, "--no-network", "--explain", cache=cache).out
        assert "- commands[1]: script changed (line 3: `echo two > /srv/TWO`)" in plan
        assert "- commands[2]: runs on top of commands[1], which changed" in plan
        assert "- overlays: /etc/resolv.conf content changed" in plan
        assert "- commands[3]: never built (new since the last build)" in plan
        assert "cached  run[0]" in plan

        as_json = json.loads(rfs("plan", pkg, "-o", out, "--no-network", "--json", cache=cache).out)
        validate_events([as_json])
        by_step = {s["step"]: s for s in as_json["steps"]}
        assert by_step["overlays"]["changes"] == ["overlays: /etc/resolv.conf content changed"]
        assert by_step["run[0]"]["action"] == "cached" and "changes" not in by_step["run[0]"]

        # the same tag now names another image
        _derived_image(docker_client, other)
        docker_client.images.get(other).tag(*moving.rsplit(":", 1))
        plan = rfs("plan", pkg, "-o", out, "--no-network", "--explain", cache=cache).out
        assert f"- base: image {moving} now resolves to a different ID (sha256:" in plan
        assert "- commands[0]: runs on a different base image" in plan
    finally:
        for tag in (moving, other):
            with contextlib.suppress(Exception):  # already gone
                docker_client.images.remove(tag, force=True)


# --- rfs graph ------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG, checking the signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_graph_png_and_dot(tmp_path: Path, cache: Path) -> None:
    if shutil.which("dot") is None:
        require_or_skip("Graphviz's dot is missing (scripts/setup-host.sh installs graphviz)")
    pkg = make_package(tmp_path / "pkg")
    out = tmp_path / "out.ext4"
    rfs("build", pkg, "-o", out, "--no-network", cache=cache)
    (pkg / "files" / "motd").write_text("edited\n")

    dot = rfs("graph", pkg, "--image", out, "--no-network", cache=cache).out
    nodes = dict(re.findall(r'^  "([^"]+)" \[label="([^"]*)"', dot, re.M))
    assert list(nodes) == [
        "base",
        "run[0]",
        "diff[0]",
        "run[1]",
        "diff[1]",
        "run[2]",
        "diff[2]",
        "overlays",
        "assemble",
    ]
    # each command on the one before; each diff on its command and the diff before; the
    # assembly on every diff and the overlays
    assert len(re.findall(r"^  \"[^\"]+\" -> \"[^\"]+\";$", dot, re.M)) == 13
    assert "\\nnot needed · last " in nodes["run[1]"]  # cached downstream, timed last build
    assert "\\ncached · last " in nodes["diff[2]"]
    assert "\\nto run · last " in nodes["overlays"]
    assert "why: /etc/motd content changed" in nodes["overlays"]

    png = tmp_path / "graph.png"
    rfs("graph", pkg, "--image", out, "--no-network", "--format", "png", "-o", png, cache=cache)
    chunks = _png_chunks(png.read_bytes())
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 100 and height > 300  # nine boxes
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) > width * height  # the image data is all there
    svg = rfs("graph", pkg, "--image", out, "--no-network", "--format", "svg", cache=cache).out
    assert svg.count('class="node"') == 9


# --- --watch --------------------------------------------------------------------------------


def test_watch_rebuilds_on_change_and_ends_on_ctrl_c(tmp_path: Path, cache: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    out = tmp_path / "out.ext4"
    running = Rfs(cache).start(
        "build", pkg, "-o", out, "--no-network", "--watch", new_session=False
    )
    lines = running.err  # stderr, line by line, as rfs writes it

    def wait_for(text: str, count: int = 1) -> None:
        deadline = time.monotonic() + 60
        while running.lines(text) < count:
            assert running.proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)

    try:
        wait_for("rfs: watching")
        (pkg / "files" / "motd").write_text("changed while watching\n")
        wait_for("rfs: changed: files/motd: building again")
        wait_for("rfs: watching", 2)
        assert sum(line.startswith("  done     assemble") for line in lines) == 2
        assert content(out, "/etc/motd") == b"changed while watching\n"
        running.proc.send_signal(signal.SIGINT)
        assert running.finish(timeout=20).code == 0
        assert lines[-1] == "rfs: stopped watching\n"
        assert not any("Traceback" in line for line in lines)
    finally:
        running.kill()


# --- a real terminal: the live display and --keep-failed -----------------------------------


class Tmux:
    """A bash in a tmux session of a fixed size, typed into and read like a person would."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            require_or_skip("tmux is missing (scripts/setup-host.sh installs it)")
        self.tmux = str(tmux)
        self.name = f"rfs-ux-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(
            [
                self.tmux,
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                "160",
                "-y",
                "50",
                "-c",
                str(cwd),
                f"env TERM=xterm-256color {exports} bash --norc",
            ],
            check=True,
        )
        self.type("PS1='$ '; clear")

    def type(self, line: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, "-l", line], check=True)
        subprocess.run([self.tmux, "send-keys", "-t", self.name, "Enter"], check=True)

    def screen(self, joined: bool = False) -> str:
        args = [self.tmux, "capture-pane", "-p", "-t", self.name, "-S", "-200"]
        return subprocess.run(
            args + (["-J"] if joined else []), capture_output=True, text=True, check=True
        ).stdout

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        return self.wait_until(
            lambda shown: re.search(pattern, shown, re.M) is not None, repr(pattern), timeout
        )

    def wait_until(self, shows: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The screen, once `shows(screen)` is true; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.screen()
            if shows(shown):
                return shown
            time.sleep(0.05)
        raise AssertionError(f"{what} never appeared:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], check=False)


@pytest.fixture
def terminal(tmp_path: Path, cache: Path) -> Iterator[Tmux]:
    env = {"RFS_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[2])}
    term = Tmux(tmp_path, env)
    yield term
    term.close()


def test_live_display_in_a_terminal(tmp_path: Path, terminal: Tmux) -> None:
    pkg = make_package(tmp_path / "pkg")
    toml = pkg / "build.toml"
    # a command of its own (new key) that prints, then stays busy long enough to be watched
    toml.write_text(
        toml.read_text()
        + f"""
[[commands]]
script_inline = '''
#!/bin/sh
echo live-{uuid.uuid4().hex[:8]}
sleep 2.5
echo finished-sleeping
'''
"""
    )
    terminal.type(f"{sys.executable} -m rfs build pkg -o out.ext4 --no-network; echo EXIT=$?")
    terminal.wait_for(r"│ live-")  # the command's output arrives while it sleeps
    during = terminal.wait_for(r"running\s+run\[3\].*\d\.\d\d s")
    # the footer: the running step with its elapsed time, the count, the total time
    assert re.search(r"^\S running\s+run\[3\] .*\d+\.\d\d s$", during, re.M), during
    assert re.search(r"step 1 of 3 to run · 5 cached ·", during), during  # run[2], diffs, overlays
    # finished steps above it, the command's output under its step's header
    assert re.search(r"✓ cached\s+run\[2\]", during), during
    assert re.search(r"▶ run\s+run\[3\].*\n\s+│ live-", during), during
    running = r"running\s+run\[3\] .* (\d+\.\d\d) s$"
    first = float(re.findall(running, during, re.M)[-1])

    def ticked(shown: str) -> bool:
        elapsed = re.findall(running, shown, re.M)
        return bool(elapsed) and float(elapsed[-1]) > first

    # the command sleeps 2.5 s: a footer that does not tick is gone before it shows more
    terminal.wait_until(ticked, "the elapsed time of run[3] to tick", timeout=10)
    final = terminal.wait_for(r"^EXIT=0$")
    assert "running" not in final  # the footer is gone, redrawn in place, never scrolled
    assert re.search(r"│ finished-sleeping\n\s+✓ done\s+run\[3\]", final), final
    for step in ("diff[3]", "assemble"):
        assert re.search(rf"✓ done\s+{re.escape(step)} ", final), final
    assert re.search(r"^\s*step\s+result\s+time\s+size", final, re.M), final
    assert re.search(r"^\s*run\[3\]\s+ran\s+\d+\.\d\d s", final, re.M), final
    assert re.search(r"^3 step\(s\) ran, 5 cached, .* the cache saved", final, re.M), final


def test_keep_failed_prints_a_shell_command_that_works(
    tmp_path: Path, terminal: Tmux, docker_client: Any
) -> None:
    pkg = make_package(tmp_path / "pkg")
    toml = pkg / "build.toml"
    toml.write_text(
        toml.read_text().replace(
            'command = "touch /srv/three"',
            f"""script_inline = '''
#!/bin/sh
echo kept-{uuid.uuid4().hex[:8]} > /srv/marker
exit 3
'''""",
        )
    )
    terminal.type(
        f"{sys.executable} -m rfs build pkg -o out.ext4 --no-network --keep-failed; echo EXIT=$?"
    )
    shown = terminal.wait_for(r"^EXIT=\d+$")
    joined = terminal.screen(joined=True)
    assert "EXIT=1" in shown
    match = re.search(
        r"get a shell in it: +(docker commit (\w+) (\S+) && docker run .*)$", joined, re.M
    )
    assert match, joined
    command, container, image = match.groups()
    try:
        state = docker_client.containers.get(container).attrs["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 3)  # kept, stopped
        terminal.type("clear; " + command)
        terminal.wait_for(r"^/ #$")  # a shell in the image, which has no default command
        terminal.type("cat /srv/marker; exit")
        after = terminal.wait_for(r"^kept-\w+$")
        assert "kept-" in after
    finally:
        with contextlib.suppress(Exception):  # already gone
            docker_client.containers.get(container).remove(force=True)
        with contextlib.suppress(Exception):
            docker_client.images.remove(image, force=True)
