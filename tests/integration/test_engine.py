"""The engine adapter against the real engine: running, committing, exporting, cleaning up.

Every container these tests make carries the run label, and each test checks on the way out
that none is left (`_no_leftover_containers`).
"""

from __future__ import annotations

import errno
import http.server
import os
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.engine import MANAGED_LABEL, Engine, Mount, RunSpec, connect
from rfs.engine.docker_engine import DockerEngine
from rfs.errors import EngineError, EnvironmentProblem, StepFailed, UsageError
from tests.tarmembers import member_bytes

pytestmark = pytest.mark.integration


def _labelled_containers(engine: Engine, run_label: str) -> list[dict[str, Any]]:
    import docker

    api: Any = docker.APIClient(base_url=getattr(engine, "base_url", None), version="1.40")
    try:
        found: list[dict[str, Any]] = api.containers(
            all=True, filters={"label": [f"{MANAGED_LABEL}=1", run_label]}
        )
    finally:
        api.close()
    return found


@pytest.fixture(autouse=True)
def _no_leftover_containers(request: pytest.FixtureRequest, run_label: str) -> Iterator[None]:
    yield
    if "docker_engine" in request.fixturenames:
        engine: Engine = request.getfixturevalue("docker_engine")
        engine.settle()
        assert _labelled_containers(engine, run_label) == []


class Run:
    """Runs steps in the engine under test with the run label, collecting their output."""

    def __init__(
        self, engine: Engine, image: str, labels: dict[str, str], tmp_tag: Callable[[str], str]
    ) -> None:
        self.engine, self.image, self.labels, self.tmp_tag = engine, image, labels, tmp_tag
        self.chunks: list[bytes] = []

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)

    def __call__(
        self, *argv: str, image: str | None = None, step: str = "run[0]", **settings: Any
    ) -> str:
        self.chunks = []
        spec = RunSpec(image=image or self.image, argv=argv, labels=self.labels, **settings)
        return self.engine.run_and_commit(
            spec, step=step, tag=self.tmp_tag("layer"), on_output=self.chunks.append
        )


@pytest.fixture
def run(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
) -> Run:
    return Run(docker_engine, busybox_image, run_labels, tmp_tag)


# -- reaching the engine ----------------------------------------------------------------


def test_import_does_not_load_the_sdk() -> None:
    code = "import sys, rfs.engine; assert 'docker' not in sys.modules, 'docker imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ping_missing_socket_says_what_is_wrong(tmp_path: Path) -> None:
    uri = f"unix://{tmp_path}/no-such.sock"
    with pytest.raises(EngineError) as caught:
        connect("docker", uri).ping()
    assert str(caught.value) == (
        f"cannot reach the Docker engine at {uri}: no such socket — is dockerd running?"
    )
    assert caught.value.exit_code == 3


def test_ping_refused_socket_says_connection_refused(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound but not listening: connect() is refused
        with pytest.raises(EngineError, match="connection refused — is dockerd running"):
            connect("docker", f"unix://{path}").ping()


def test_podman_messages_name_podman(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"cannot reach the Podman engine .* Podman API service"):
        connect("podman", f"unix://{tmp_path}/podman.sock").ping()


def test_connect_checks_the_engine_name_and_knows_local_sockets() -> None:
    with pytest.raises(UsageError, match="unknown container engine 'lxc'"):
        connect("lxc", "unix:///run/lxc.sock")
    assert connect("podman", "unix:///run/podman/podman.sock").local
    assert not connect("docker", "tcp://192.0.2.1:2375").local


def test_ping_and_version(docker_engine: Engine) -> None:
    docker_engine.ping()
    assert docker_engine.version()[0].isdigit()


# -- images -----------------------------------------------------------------------------


def test_resolve_base_of_a_local_image_is_its_id(docker_engine: Engine, busybox_image: str) -> None:
    name, tag = busybox_image.rsplit(":", 1)
    resolved = docker_engine.resolve_base(name, tag)
    assert resolved.startswith("sha256:")
    assert resolved == docker_engine.image_id(busybox_image)


def test_resolve_base_of_a_missing_image_fails_fast(docker_engine: Engine) -> None:
    started = time.monotonic()
    with pytest.raises(EnvironmentProblem) as caught:
        docker_engine.resolve_base("nosuch/image", "1")
    assert time.monotonic() - started < 25
    assert str(caught.value).startswith(
        "base image nosuch/image:1 is not present locally and could not be pulled: "
    )
    assert caught.value.exit_code == 3


class _StallingPull(http.server.BaseHTTPRequestHandler):
    """An engine API whose registry never answers: inspect says 404, pull sends nothing."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"message": "No such image"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        time.sleep(5)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "test"  # unix sockets have no (host, port)


def test_resolve_base_gives_up_when_the_pull_stalls(tmp_path: Path) -> None:
    path = str(tmp_path / "stall.sock")
    server = socketserver.ThreadingUnixStreamServer(path, _StallingPull)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = DockerEngine(f"unix://{path}", pull_timeout_s=1)
        started = time.monotonic()
        with pytest.raises(EnvironmentProblem, match="no progress for 1 s"):
            engine.resolve_base("some/image", "1")
        assert time.monotonic() - started < 4
    finally:
        server.shutdown()
        server.server_close()


def test_tag_and_remove_image(
    docker_engine: Engine, busybox_image: str, tmp_tag: Callable[[str], str]
) -> None:
    image_id = docker_engine.image_id(busybox_image)
    assert image_id is not None
    alias = tmp_tag("alias")
    assert not docker_engine.has_tag(alias)
    docker_engine.tag(image_id, alias)
    assert docker_engine.has_tag(alias)
    assert docker_engine.image_id(alias) == image_id
    docker_engine.remove_image(alias)
    assert not docker_engine.has_tag(alias)
    docker_engine.remove_image(alias)  # already gone: not an error
    assert docker_engine.has_tag(busybox_image)


# -- running steps ----------------------------------------------------------------------


def test_output_in_order_and_the_layer_holds_the_file(run: Run, docker_engine: Engine) -> None:
    script = "for i in 1 2 3 4 5; do echo line $i; done; echo made > /made-by-step"
    layer = run("sh", "-c", script)
    assert layer.startswith("sha256:")
    assert run.output == b"".join(b"line %d\n" % i for i in range(1, 6))

    run("cat", "/made-by-step", image=layer, step="run[1]")
    assert run.output == b"made\n"


def test_fast_commands_lose_no_output(run: Run) -> None:
    expected = b"".join(b"%d\n" % i for i in range(1, 301))
    for _ in range(5):
        run("busybox", "seq", "1", "300")
        assert run.output == expected


def test_commit_tags_the_layer(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
) -> None:
    tag = tmp_tag("tagged")
    spec = RunSpec(image=busybox_image, argv=("true",), labels=run_labels)
    layer = docker_engine.run_and_commit(spec, step="run[0]", tag=tag, on_output=lambda _: None)
    assert docker_engine.has_tag(tag)
    assert docker_engine.image_id(tag) == layer


def test_a_moved_tag_leaves_no_untagged_image(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
) -> None:
    """A build from an empty cache makes a layer again under the same tag: the image the tag
    left must go, unless something still needs it (here: a child layer)."""
    tag, child_tag = tmp_tag("again"), tmp_tag("child")

    def commit(argv: tuple[str, ...], image: str, to: str) -> str:
        spec = RunSpec(image=image, argv=argv, labels=run_labels)
        return docker_engine.run_and_commit(spec, step="run[0]", tag=to, on_output=lambda _: None)

    first = commit(("touch", "/one"), busybox_image, tag)
    second = commit(("touch", "/two"), busybox_image, tag)
    assert first != second and docker_engine.image_id(tag) == second
    assert docker_engine.image_id(first) is None  # gone, not left dangling
    child = commit(("touch", "/three"), second, child_tag)
    third = commit(("touch", "/four"), busybox_image, tag)
    assert docker_engine.image_id(tag) == third
    # The child layer is intact: Docker keeps `second` as its parent; Podman's storage counts
    # the shared layers and lets the image record go.
    check_tag = tmp_tag("check")
    commit(("test", "-e", "/two"), child, check_tag)
    docker_engine.remove_image(check_tag)
    if docker_engine.name == "docker":
        assert docker_engine.image_id(second) == second
    docker_engine.remove_image(child_tag)  # the child goes, and with it its untagged parent
    assert docker_engine.image_id(child) is None and docker_engine.image_id(second) is None
    base_id = docker_engine.image_id(busybox_image)
    assert base_id is not None
    docker_engine.tag(base_id, child_tag)
    docker_engine.tag(third, child_tag)  # the base keeps its own tag: the engine refuses
    assert docker_engine.image_id(busybox_image) == base_id


def test_nonzero_exit_raises_step_failed_with_the_tail(run: Run) -> None:
    script = "for i in $(busybox seq 1 30); do echo line $i; done; echo oops >&2; exit 3"
    with pytest.raises(StepFailed) as caught:
        run("sh", "-c", script, step="run[2] (install)")
    failure = caught.value
    assert failure.step == "run[2] (install)"
    assert str(failure) == "step run[2] (install) failed: exited with code 3"
    lines = failure.output_tail.splitlines()
    # stdout and stderr are separate pipes: "oops" may be delivered before the stdout lines
    # printed ahead of it, but the tail must still show it.
    assert len(lines) <= 20
    assert "line 30" in lines and "oops" in lines and "line 5" not in lines


def test_tail_is_the_last_twenty_lines(run: Run) -> None:
    with pytest.raises(StepFailed) as caught:
        run("sh", "-c", "busybox seq 1 100; exit 1")
    assert caught.value.output_tail.splitlines() == [str(i) for i in range(81, 101)]


def test_a_silent_step_outlasting_the_client_timeout_loses_nothing(
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
    docker_engine: Engine,
) -> None:
    engine = connect(docker_engine.name, getattr(docker_engine, "base_url", None), timeout_s=1)
    chunks: list[bytes] = []
    spec = RunSpec(
        image=busybox_image, argv=("sh", "-c", "echo a; sleep 3; echo b"), labels=run_labels
    )
    engine.run_and_commit(spec, step="run[0]", tag=tmp_tag("quiet"), on_output=chunks.append)
    engine.settle()  # an engine of its own: the leftover check settles only `docker_engine`
    assert b"".join(chunks) == b"a\nb\n"


def test_missing_executable_is_a_step_failure(run: Run) -> None:
    with pytest.raises(StepFailed, match=r'could not start: exec: "/no/such/tool"'):
        run("/no/such/tool")


def test_timeout_stops_the_command(run: Run) -> None:
    started = time.monotonic()
    with pytest.raises(StepFailed, match=r"timed out after 1 s") as caught:
        run("sh", "-c", "echo started; sleep 60", timeout_s=1, stop_timeout_s=1)
    assert time.monotonic() - started < 15
    assert caught.value.output_tail == "started"


def test_user_working_dir_and_env_are_honoured(run: Run) -> None:
    run(
        "sh",
        "-c",
        'id -u; id -g; pwd; echo "$GREETING"',
        user="1234:2345",
        working_dir="/tmp",
        env={"GREETING": "hello there"},
    )
    assert run.output.decode().splitlines() == ["1234", "2345", "/tmp", "hello there"]


def test_a_steps_settings_do_not_leak_into_the_next(run: Run, docker_engine: Engine) -> None:
    layer = run(
        "sh",
        "-c",
        "true",
        user="1234:2345",
        working_dir="/tmp",
        env={"STEP_ONE": "1", "PATH": "/bin"},
    )
    run("sh", "-c", 'id -u; pwd; echo "${STEP_ONE-unset}"; echo "$PATH"', image=layer)
    user, cwd, step_one, path = run.output.decode().splitlines()
    assert (user, cwd) == ("0", "/")
    if docker_engine.name == "docker":  # Podman's commit can set env vars but not unset them
        assert step_one == "unset"
        assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_run_labels_do_not_stick_to_the_layer(
    run: Run, docker_engine: Engine, run_label: str
) -> None:
    layer = run("true")
    # A container made from the layer without our labels must not match our filters.
    import docker

    api: Any = docker.APIClient(base_url=getattr(docker_engine, "base_url", None), version="1.40")
    cid = api.create_container(layer, command=["true"])["Id"]
    try:
        labels = api.inspect_container(cid)["Config"]["Labels"] or {}
        assert labels.get(MANAGED_LABEL, "") != "1"
        assert labels.get(run_label.split("=")[0], "") == ""
    finally:
        api.remove_container(cid, force=True)
        api.close()


def test_mounts_network_and_hostname(run: Run, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("from the host\n")
    run(
        "sh",
        "-c",
        "cat /in/input.txt; touch /in/x 2>/dev/null || echo read-only; "
        "hostname; busybox grep -c : /proc/net/dev",
        mounts=(Mount(str(tmp_path), "/in"),),
        hostname="rfs-step",
        network=False,
    )
    # /proc/net/dev lists one interface per line after two header lines (which contain ':'
    # only in the interface lines): with network=False only "lo" is there.
    assert run.output.decode().splitlines() == ["from the host", "read-only", "rfs-step", "1"]


def test_keyboard_interrupt_in_on_output_removes_the_container(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    run_label: str,
    tmp_tag: Callable[[str], str],
) -> None:
    def interrupt(_: bytes) -> None:
        raise KeyboardInterrupt

    spec = RunSpec(
        image=busybox_image, argv=("sh", "-c", "echo first; sleep 60"), labels=run_labels
    )
    tag = tmp_tag("interrupted")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        docker_engine.run_and_commit(spec, step="run[0]", tag=tag, on_output=interrupt)
    assert time.monotonic() - started < 15
    assert _labelled_containers(docker_engine, run_label) == []
    assert not docker_engine.has_tag(tag)


def test_remove_containers_by_label(
    docker_engine: Engine, busybox_image: str, run_label: str
) -> None:
    import docker

    api: Any = docker.APIClient(base_url=getattr(docker_engine, "base_url", None), version="1.40")
    key, value = run_label.split("=")
    extra = {key: value, MANAGED_LABEL: "1", "org.rfs.test-case": "remove"}
    for _ in range(2):
        api.create_container(busybox_image, command=["true"], labels=extra)
    api.close()
    assert docker_engine.remove_containers("org.rfs.test-case=remove") == 2
    assert docker_engine.remove_containers("org.rfs.test-case=remove") == 0


# -- export -----------------------------------------------------------------------------


def test_export_streams_owners_and_mode_bits(
    run: Run, docker_engine: Engine, run_labels: dict[str, str], tmp_path: Path
) -> None:
    layer = run(
        "sh",
        "-c",
        "mkdir /data && echo hi > /data/suid && chown 4242:4343 /data/suid"
        " && chmod 4755 /data/suid && echo big > /data/bigid"
        " && chown 3000000:3000001 /data/bigid",
    )
    progress: list[int] = []
    dest = tmp_path / "rootfs.tar"
    with dest.open("wb") as out:
        docker_engine.export(layer, out, labels=run_labels, on_progress=progress.append)
    assert progress and progress[-1] == dest.stat().st_size
    with tarfile.open(dest) as tar:
        suid = tar.getmember("data/suid")
        # Docker writes the file-type bits into every header's mode (0o104755 here).
        assert (suid.uid, suid.gid, suid.mode & 0o7777) == (4242, 4343, 0o4755)
        assert member_bytes(tar, suid) == b"hi\n"
        big = tar.getmember("data/bigid")
        assert (big.uid, big.gid) == (3000000, 3000001)
        assert "bin/busybox" in tar.getnames()


def test_keyboard_interrupt_during_export_removes_the_container(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    run_label: str,
) -> None:
    def interrupt(_: int) -> None:
        raise KeyboardInterrupt

    with open(os.devnull, "wb") as sink, pytest.raises(KeyboardInterrupt):
        docker_engine.export(busybox_image, sink, labels=run_labels, on_progress=interrupt)
    assert _labelled_containers(docker_engine, run_label) == []


def test_export_write_failure_is_reported(
    docker_engine: Engine, busybox_image: str, run_labels: dict[str, str]
) -> None:
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(EnvironmentProblem) as caught:
        docker_engine.export(busybox_image, full, labels=run_labels)
    assert os.strerror(errno.ENOSPC) in str(caught.value)


def test_export_of_a_missing_image_is_an_engine_error(
    docker_engine: Engine, run_labels: dict[str, str]
) -> None:
    with open(os.devnull, "wb") as sink, pytest.raises(EngineError, match=r"(?i)no such image"):
        docker_engine.export("rfs-test-tmp/never-made:1", sink, labels=run_labels)
