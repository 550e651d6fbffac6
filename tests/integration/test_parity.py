"""buildfs parity, end to end through `rfs` on the real engines (Docker, then Podman).

Each build here exercises several fields at once and checks each one's effect in the image or
in the container run, and, through a recording proxy in front of the engine's socket
(`tests/engineproxy.py`), in the exact container config rfs asked the engine for. Builds run
without a network (`--no-network`): nothing here needs one, and the result must not depend on
the host's bridge.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from rfs.engine import Engine
from rfs.engine.base import PROBE_LABEL
from tests.conftest import engine_url
from tests.constants import BUSYBOX, BUSYBOX_IMAGE
from tests.engineproxy import EngineProxy
from tests.fsinspect import Entry, list_ext4, read_ext4_file
from tests.packages import write_package
from tests.rfsrun import Rfs, Run, containers_of

pytestmark = pytest.mark.integration

IMAGE = f"{BUSYBOX_IMAGE}\n"
CAP_CHOWN, CAP_NET_ADMIN, CAP_SYS_ADMIN = 0, 12, 21


@pytest.fixture
def rfs(tmp_path: Path, engine_client: Any) -> Iterator[Rfs]:
    runner = Rfs(tmp_path / "cache")
    yield runner
    for run_id in runner.run_ids:  # nothing left behind, whatever happened
        left = containers_of(engine_client, run_id)
        assert left == [], f"containers left behind: {[c.id[:12] for c in left]}"


@pytest.fixture
def plain_rfs(tmp_path: Path) -> Rfs:
    """For tests that need no engine (they run once, not once per engine)."""
    return Rfs(tmp_path / "cache")


@pytest.fixture
def proxy(docker_engine: Engine) -> Iterator[EngineProxy]:
    """A recording proxy on a unix socket in front of the engine under test."""
    upstream = engine_url(docker_engine).removeprefix("unix://")
    where = Path(tempfile.mkdtemp(prefix="rfs-proxy-"))  # short: socket paths are limited
    recorder = EngineProxy(upstream, where / "engine.sock")
    yield recorder
    recorder.close()
    shutil.rmtree(where, ignore_errors=True)


def text(image: Path, tree: dict[str, Entry], path: str) -> str:
    return read_ext4_file(image, tree[path].inode).decode()


def run_containers(proxy: EngineProxy) -> list[dict[str, Any]]:
    """The create requests of command containers (the export's is never started)."""
    return [c for c in proxy.created() if c.get("Cmd") != ["/.rfs-export-container-never-runs"]]


# -- [[commands]] and [container] -----------------------------------------------------------

FIELDS = """
[filesystem]
size_mib = 32

[container]
ENGINE_IMAGE
connection_uri = "PROXY"
env = { CENV = "from-container", SHARED = "container" }
hostname = "parity-host"
volumes = { "/vol" = "/mnt/vol" }
cap_add = ["NET_ADMIN"]
cap_drop = ["CHOWN"]
oci_runtime = "runc"
timeout = 120
wait_timeout_s = 3

# Split on whitespace and run without a shell: every word reaches echo as written.
[[commands]]
command = "echo   $HOME   >   /not-created"

# No #! line: run by /bin/sh.
[[commands]]
env = { SHARED = "command", CMDENV = "c" }
script_inline = '''
mkdir -p /out /home/u
chmod 1777 /out /home/u
tr '\\0' ' ' < /proc/$$/cmdline > /out/cmdline
hostname > /out/hostname
cat /mnt/vol/input > /out/volume
cat /etc/mounted.conf > /out/mounted
grep CapEff /proc/self/status > /out/caps
echo "$CENV $SHARED $CMDENV" > /out/env
if chown 1:1 /out/cmdline 2>/dev/null; then echo allowed; else echo refused; fi > /out/chown
for f in /mnt/vol/new /etc/mounted.conf; do
    if echo x >> $f 2>/dev/null; then echo writable; else echo read-only; fi
done > /out/read-only
echo "$((6 * 7))-marker"
'''

# A #! line with an argument: awk -f runs it (sh could not).
[[commands]]
script_inline = '''#!/usr/bin/awk -f
BEGIN { print "awk ran" > "/out/awk" }
'''

# A package script that is not executable, run as uid:gid in a working directory.
[[commands]]
script_path = "/scripts/ids.sh"
uid = 1000
gid = 100
working_dir = "/home/u"

[[overlays]]
source = "/files/mounted.conf"
destination = "/etc/mounted.conf"
mounted = true
"""
IDS = "id -u > /out/uid\nid -g > /out/gid\npwd > /out/pwd\ntouch mine\n"


def test_command_and_container_fields(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        FIELDS.replace("ENGINE_IMAGE", engine_toml + IMAGE).replace("PROXY", proxy.uri),
        {
            "scripts/ids.sh": IDS,
            "vol/input": "volume content\n",
            "files/mounted.conf": "mounted content\n",
        },
    )
    out = tmp_path / "fields.ext4"
    built = rfs("-l", "debug", "build", pkg, "-o", out, "--no-network")
    assert built.code == 0, built.err
    t = list_ext4(out)

    assert "$HOME > /not-created" in built.err and "/not-created" not in t
    assert text(out, t, "/out/cmdline") == "/bin/sh /.rfs/script "
    assert text(out, t, "/out/awk") == "awk ran\n"
    assert text(out, t, "/out/hostname") == "parity-host\n"
    assert text(out, t, "/out/env") == "from-container command c\n"
    assert text(out, t, "/out/volume") == "volume content\n"
    assert text(out, t, "/out/mounted") == "mounted content\n"  # seen during the build
    assert text(out, t, "/etc/mounted.conf") == "mounted content\n"  # and in the image
    caps = int(text(out, t, "/out/caps").split()[1], 16)
    assert caps & (1 << CAP_NET_ADMIN) and not caps & (1 << CAP_CHOWN)
    assert text(out, t, "/out/chown") == "refused\n"
    assert text(out, t, "/out/read-only") == "read-only\nread-only\n"  # volume, overlay
    assert (text(out, t, "/out/uid"), text(out, t, "/out/gid")) == ("1000\n", "100\n")
    assert text(out, t, "/out/pwd") == "/home/u\n"
    assert (t["/home/u/mine"].uid, t["/home/u/mine"].gid) == (1000, 100)
    # -l debug logs every tool rfs runs; the commands' output is shown (no -e)
    assert re.search(r"DEBUG: \+ \S*mke2fs .*-d -", built.err)
    assert "42-marker" in built.err

    # what the engine was asked for, container by container
    created = run_containers(proxy)
    assert len(created) == 4
    for c in created:
        host = c["HostConfig"]
        assert (host["CapAdd"], host["CapDrop"], host["Runtime"]) == (
            ["NET_ADMIN"],
            ["CHOWN"],
            "runc",
        )
        assert not host.get("Privileged")
        assert (c["Hostname"], c["StopTimeout"]) == ("parity-host", 3)
        mounts = {m["Target"]: m for m in host["Mounts"]}
        assert mounts["/mnt/vol"]["ReadOnly"] and mounts["/etc/mounted.conf"]["ReadOnly"]
    assert "CENV=from-container" in created[0]["Env"]
    assert {"SHARED=command", "CMDENV=c"} <= set(created[1]["Env"])
    assert created[0]["Cmd"] == ["echo", "$HOME", ">", "/not-created"]
    assert created[2]["Cmd"] == ["/usr/bin/awk", "-f", "/.rfs/script"]
    assert (created[3]["User"], created[3]["WorkingDir"]) == ("1000:100", "/home/u")

    # -q (also -e, --no-exec-logs; before or after the verb) hides the commands' output (an
    # unchanged build runs nothing, so use a fresh cache)
    quiet = Rfs(tmp_path / "cache-quiet")
    quiet.run_ids = rfs.run_ids  # checked for leftovers like the others
    hushed = quiet("build", "-q", pkg, "-o", tmp_path / "quiet.ext4", "--no-network")
    assert hushed.code == 0, hushed.err
    assert "42-marker" not in hushed.err and "DEBUG" not in hushed.err

    # volumes and mounted overlays are inputs of every command that sees them
    (pkg / "vol" / "input").write_text("changed\n")
    plan = rfs("plan", pkg, "-o", out, "--no-network")
    assert all(f"run     run[{i}]" in plan.out for i in range(4)), plan.out
    assert "run     overlays" not in plan.out
    (pkg / "vol" / "input").write_text("volume content\n")
    (pkg / "files" / "mounted.conf").write_text("edited\n")
    plan = rfs("plan", pkg, "-o", out, "--no-network")
    assert all(f"run     run[{i}]" in plan.out for i in range(4)) and "run     overlays" in plan.out


def test_connection_uri_over_tcp(
    rfs: Rfs, docker_engine: Engine, tmp_path: Path, engine_toml: str
) -> None:
    tcp = EngineProxy(engine_url(docker_engine).removeprefix("unix://"))
    try:
        pkg = write_package(
            tmp_path / "pkg",
            f"[filesystem]\nsize_mib = 16\n[container]\n"
            f'{engine_toml}{IMAGE}connection_uri = "{tcp.uri}"\n',
        )
        plan = rfs("plan", pkg, "-o", tmp_path / "x.ext4")
        assert plan.code == 0, plan.err
        assert any(path.endswith(f"/images/{BUSYBOX}/json") for _, path, _ in tcp.requests())
    finally:
        tcp.close()


def test_docker_host_is_the_default_address(
    rfs: Rfs, proxy: EngineProxy, engine_kind: str, tmp_path: Path
) -> None:
    if engine_kind != "docker":
        pytest.skip("DOCKER_HOST names Docker's socket; Podman's default is its own socket")
    pkg = write_package(tmp_path / "pkg", f"[filesystem]\nsize_mib = 16\n[container]\n{IMAGE}")
    plan = rfs("plan", pkg, "-o", tmp_path / "x.ext4", env={"DOCKER_HOST": proxy.uri})
    assert plan.code == 0, plan.err
    assert proxy.requests(), "rfs did not use DOCKER_HOST"


# -- privileged and rootful -------------------------------------------------------------------

PRIVILEGED = """
[filesystem]
size_mib = 16
[container]
ENGINE_IMAGE
connection_uri = "PROXY"
[[commands]]
command = "true"
[[commands]]
privileged = true
script_inline = "grep CapEff /proc/self/status > /caps"
"""


@dataclass
class PrivilegedBuilds:
    privileged: Run
    rootful: Run
    privileged_created: list[dict[str, Any]]
    rootful_created: list[dict[str, Any]]
    image: Path


@pytest.fixture
def privileged_builds(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> PrivilegedBuilds:
    build = PRIVILEGED.replace("ENGINE_IMAGE", engine_toml + IMAGE).replace("PROXY", proxy.uri)
    out = tmp_path / "priv.ext4"
    first = rfs("build", write_package(tmp_path / "a", build), "-o", out, "--no-network")
    first_created = run_containers(proxy)
    rootful = build.replace("[container]\n", "[container]\nrootful = true\n").split(
        "[[commands]]\nprivileged"
    )[0]
    second = rfs(
        "build", write_package(tmp_path / "b", rootful), "-o", tmp_path / "r.ext4", "--no-network"
    )
    return PrivilegedBuilds(
        first, second, first_created, run_containers(proxy)[len(first_created) :], out
    )


REFUSED = re.compile(r"unable to apply caps|operation not permitted", re.I)


def privileged_flags(created: list[dict[str, Any]], probes: bool) -> list[bool]:
    """Privileged per create request: of the steps' containers, or of rfs's probes."""
    return [
        c["HostConfig"].get("Privileged", False)
        for c in created
        if (PROBE_LABEL in (c.get("Labels") or {})) == probes
    ]


def test_privileged_and_rootful_reach_the_engine(privileged_builds: PrivilegedBuilds) -> None:
    b = privileged_builds
    assert privileged_flags(b.privileged_created, probes=False) == [False, True]
    assert privileged_flags(b.rootful_created, probes=False) == [True]
    for run, created, field in (
        (b.privileged, b.privileged_created, "commands[1].privileged"),
        (b.rootful, b.rootful_created, "container.rootful"),
    ):
        # Either the host runs privileged containers, or the build fails with exit 3 naming
        # the field, after trying the same image privileged and not.
        if run.code == 0:
            assert privileged_flags(created, probes=True) == []
        else:
            assert run.code == 3 and f"{field}: asks for privileged containers" in run.err
            assert REFUSED.search(run.err) and "Traceback" not in run.err, run.err
            assert privileged_flags(created, probes=True) == [True, False]


def test_privileged_command_has_every_capability(privileged_builds: PrivilegedBuilds) -> None:
    b = privileged_builds
    if b.privileged.code != 0:
        found = REFUSED.search(b.privileged.err)
        pytest.skip(
            "this host refuses privileged containers "
            f"({found.group(0) if found else b.privileged.err.strip()[-200:]}); the "
            "engine did receive Privileged=true (test above)"
        )
    t = list_ext4(b.image)
    caps = int(text(b.image, t, "/caps").split()[1], 16)
    assert caps & (1 << CAP_SYS_ADMIN)  # no default capability set holds it


# -- timeout and wait_timeout_s ------------------------------------------------------------------


def test_timeout_stops_a_command_that_ignores_sigterm(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        (
            f"[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}{IMAGE}"
            f'connection_uri = "{proxy.uri}"\ntimeout = 2\nwait_timeout_s = 1\n'
            "[[commands]]\nscript_inline = '''\ntrap '' TERM\necho started\nsleep 60\n'''\n"
        ),
    )
    out = tmp_path / "t.ext4"
    failed = rfs("build", pkg, "-o", out, "--no-network")
    assert failed.code == 1
    assert "run[0]" in failed.err and "timed out after 2 s" in failed.err
    assert "started" in failed.err and "Traceback" not in failed.err
    assert failed.seconds < 30  # 2 s, then SIGTERM ignored for wait_timeout_s, then SIGKILL
    assert [c["StopTimeout"] for c in run_containers(proxy)] == [1]
    assert not out.exists()


def test_a_runtime_the_engine_cannot_use_fails_the_build(
    rfs: Rfs, tmp_path: Path, engine_toml: str
) -> None:
    # Docker refuses an unknown runtime; Podman's API would silently use its default instead.
    pkg = write_package(
        tmp_path / "pkg",
        f"[filesystem]\nsize_mib = 16\n[container]\n"
        f'{engine_toml}{IMAGE}oci_runtime = "crun-x"\n'
        '[[commands]]\ncommand = "true"\n',
    )
    failed = rfs("build", pkg, "-o", tmp_path / "x.ext4", "--no-network")
    assert failed.code == 3 and "OCI runtime" in failed.err and "'crun-x'" in failed.err
    assert "Traceback" not in failed.err


# -- [[overlays]] and [export] -------------------------------------------------------------------

SELECTION = """
[filesystem]
size_mib = 32
[container]
ENGINE_IMAGE
[[commands]]
script_inline = '''
mkdir -p /keep/sub /drop
echo a > /keep/a; echo b > /keep/sub/b; echo c > /keep/c.log; echo d > /drop/d
echo x > /etc/keepme; echo y > /etc/dropme
cp /etc/seen.conf /keep/seen
echo "$((6 * 7))-marker"
'''

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
mode = 0o600
uid = 7
gid = 8

[[overlays]]
source_inline = "inline text\\n"
destination = "/srv/inline.txt"

[[overlays]]
source = "/files/tree"
destination = "/opt/tree"
is_directory = true

[[overlays]]
source = "/files/seen.conf"
destination = "/etc/seen.conf"
mounted = true

[export.files]
include = ["/etc/keepme", "/etc/passwd"]
create = ["/etc/machine-id"]

[export.directories]
include = ["/keep", "/keep/sub", "/bin"]
create = ["/tmp", "/proc", "/var/empty"]
exclude = ["*.log"]
"""


def test_overlays_and_export_selection(rfs: Rfs, tmp_path: Path, engine_toml: str) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        SELECTION.replace("ENGINE_IMAGE", engine_toml + IMAGE),
        {
            "files/motd": "motd\n",
            "files/seen.conf": "seen\n",
            "files/tree/a": "tree a\n",
            "files/tree/sub/b": "tree b\n",
            "files/tree/run.sh": "#!/bin/sh\n",
        },
    )
    (pkg / "files" / "tree" / "run.sh").chmod(0o755)
    out = tmp_path / "sel.ext4"
    built = rfs("-e", "build", pkg, "-o", out, "--no-network")
    assert built.code == 0, built.err
    assert "42-marker" not in built.err  # -e
    t = list_ext4(out)
    # export: includes (nested too), their parents, created paths; excludes and the rest gone
    assert text(out, t, "/keep/a") == "a\n" and text(out, t, "/keep/sub/b") == "b\n"
    assert text(out, t, "/keep/seen") == "seen\n"  # the mounted overlay, during the build
    assert "/keep/c.log" not in t and "/drop" not in t and "/etc/dropme" not in t
    assert text(out, t, "/etc/keepme") == "x\n" and "/etc/passwd" in t and "/bin/sh" in t
    assert "/usr" not in t and "/root" not in t
    assert t["/etc/machine-id"].type == "file" and t["/etc/machine-id"].size == 0
    assert (t["/tmp"].type, t["/tmp"].mode & 0o7777) == ("dir", 0o1777)
    assert (t["/proc"].type, t["/var/empty"].type) == ("dir", "dir")
    # overlays: after the export, with their modes and owners
    motd = t["/etc/motd"]
    assert (motd.mode & 0o7777, motd.uid, motd.gid) == (0o600, 7, 8)
    assert text(out, t, "/etc/motd") == "motd\n"
    assert text(out, t, "/srv/inline.txt") == "inline text\n"
    assert text(out, t, "/opt/tree/a") == "tree a\n"
    assert text(out, t, "/opt/tree/sub/b") == "tree b\n"
    assert t["/opt/tree/run.sh"].mode & 0o7777 == 0o755
    assert t["/opt/tree/a"].mode & 0o7777 == 0o644
    assert text(out, t, "/etc/seen.conf") == "seen\n"


# -- base image archives and archive packages ----------------------------------------------------


def _rootfs_tar_gz(engine_client: Any, extra: bytes | None = None) -> bytes:
    """The busybox image's filesystem as a gzip-compressed tarball (optionally plus a file)."""
    container = engine_client.containers.create(
        BUSYBOX, command=["true"], labels={"org.rfs.test": "1"}
    )
    try:
        raw = b"".join(container.export())
    finally:
        container.remove(force=True)
    if extra is not None:
        buf = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(raw)) as src,
            tarfile.open(fileobj=buf, mode="w") as dst,
        ):
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
            info = tarfile.TarInfo("etc/from-rootfs")
            info.size = len(extra)
            dst.addfile(info, io.BytesIO(extra))
        raw = buf.getvalue()
    return gzip.compress(raw)


def _base_tags(engine_client: Any) -> set[str]:
    # The low-level list: images.list() inspects each image and fails if one vanishes meanwhile
    return {
        t for i in engine_client.api.images() for t in (i.get("RepoTags") or []) if "rfs/base:" in t
    }


@pytest.fixture
def base_tags(engine_client: Any) -> Iterator[None]:
    """Remove the rfs/base:<digest> images a test loads."""
    before = _base_tags(engine_client)
    yield
    for tag in _base_tags(engine_client) - before:
        with contextlib.suppress(docker.errors.NotFound):
            engine_client.images.remove(tag)


def test_archive_base_image_forms(
    rfs: Rfs, engine_client: Any, tmp_path: Path, engine_toml: str, base_tags: None
) -> None:
    saved = b"".join(engine_client.images.get(BUSYBOX).save())
    rootfs = _rootfs_tar_gz(engine_client)
    build = (
        "[filesystem]\nsize_mib = 16\n[container]\n"
        + engine_toml
        + 'archive = "/images/ARCHIVE"\n[[commands]]\ncommand = "touch /made"\n'
    )
    for name, data in (("saved.tar", saved), ("rootfs.tgz", rootfs)):
        pkg = write_package(
            tmp_path / name, build.replace("ARCHIVE", name), {f"images/{name}": data}
        )
        out = tmp_path / f"{name}.ext4"
        built = rfs("build", pkg, "-o", out, "--no-network")
        assert built.code == 0, built.err
        t = list_ext4(out)
        assert "/made" in t and "/bin/busybox" in t
        plan = rfs("plan", pkg, "-o", out, "--no-network")
        assert "nothing to do" in plan.out, plan.out
    # keyed by content, not by the image ID an import makes (new each time): imported again
    # after its tag is gone, the same rootfs still matches every cached step
    for tag in _base_tags(engine_client):
        engine_client.images.remove(tag)
    plan = rfs("plan", tmp_path / "rootfs.tgz", "-o", tmp_path / "rootfs.tgz.ext4", "--no-network")
    assert "nothing to do" in plan.out, plan.out
    # a changed rootfs rebuilds every step
    pkg = tmp_path / "rootfs.tgz"
    (pkg / "images" / "rootfs.tgz").write_bytes(_rootfs_tar_gz(engine_client, b"new\n"))
    out = tmp_path / "rootfs.tgz.ext4"
    plan = rfs("plan", pkg, "-o", out, "--no-network")
    assert "run     run[0]" in plan.out and "run     diff[0]" in plan.out, plan.out
    rebuilt = rfs("build", pkg, "-o", out, "--no-network")
    assert rebuilt.code == 0, rebuilt.err
    assert text(out, list_ext4(out), "/etc/from-rootfs") == "new\n"


def test_archive_package_builds_and_leaves_no_unpacked_copy(
    rfs: Rfs, tmp_path: Path, engine_toml: str
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        (
            f"[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}{IMAGE}"
            '[[commands]]\nscript_path = "/scripts/s.sh"\n'
            '[[overlays]]\nsource = "/files/f"\ndestination = "/etc/f"\n'
        ),
        {"scripts/s.sh": "echo packed > /packed\n", "files/f": "overlay\n"},
    )
    packed = tmp_path / "package.bin"  # no telling name: the content says what it is
    assert rfs("pack", pkg, packed, "--type", "tar-gz").code == 0
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "p.ext4"
    built = rfs("build", packed, "-o", out, "--no-network", env={"TMPDIR": str(scratch)})
    assert built.code == 0, built.err
    t = list_ext4(out)
    assert text(out, t, "/packed") == "packed\n" and text(out, t, "/etc/f") == "overlay\n"
    assert list(scratch.iterdir()) == []
    # a failing build removes it too
    failing = tmp_path / "failing.tar"
    (pkg / "scripts" / "s.sh").write_text("exit 3\n")
    assert rfs("pack", pkg, failing, "--type", "tar").code == 0
    failed = rfs("build", failing, "-o", out, "--no-network", env={"TMPDIR": str(scratch)})
    assert failed.code == 1 and "exited with code 3" in failed.err
    assert list(scratch.iterdir()) == []


# -- rfs check ----------------------------------------------------------------------------------


def findings(run: Run) -> dict[str, str]:
    """path -> message of each problem `rfs check` reported."""
    found = {}
    for line in run.err.splitlines():
        m = re.match(r"rfs: (?:error|warning): .*?build\.toml: ([^:]+): (.*)", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def test_check_reports_every_problem_at_once(rfs: Rfs, tmp_path: Path, engine_toml: str) -> None:
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "mke2fs").write_text("#!/bin/sh\necho 'mke2fs 1.47.0 (5-Feb-2023)' >&2\n")
    (shim / "mke2fs").chmod(0o755)
    (tmp_path / "outside").write_text("x")
    pkg = write_package(
        tmp_path / "pkg",
        f"""
[filesystem]
size_mib = 100
block_size_mib = 3
sise_mib = 1
[container]
{engine_toml}{IMAGE}connection_uri = "unix:///nonexistent/engine.sock"
[[commands]]
command = "true"
script_inline = "true"
[[commands]]
script_path = "/scripts/missing.sh"
[[overlays]]
source = "/../outside"
destination = "/x"
[[overlays]]
source = "/link"
destination = "/y"
[[overlays]]
source_inline = "z"
""",
    )
    (pkg / "link").symlink_to(tmp_path / "outside")
    checked = rfs("check", pkg, env={"PATH": f"{shim}:{os.environ['PATH']}"})
    assert checked.code == 2, checked.err
    found = findings(checked)
    assert found["filesystem.sise_mib"] == "unknown key, ignored (did you mean 'size_mib'?)"
    assert found["filesystem.block_size_mib"] == "3 does not divide size_mib 100"
    assert found["commands[0]"].startswith("needs exactly one of command, script_inline")
    assert found["commands[1].script_path"].startswith("/scripts/missing.sh not found")
    assert "'..'" in found["overlays[0].source"]
    assert found["overlays[1].source"] == "/link leads outside the package"
    assert found["overlays[2].destination"] == "is required"
    assert "1.47.0 is too old" in found["filesystem.type"]
    assert found["container.connection_uri"].startswith("cannot reach the")
    assert "Traceback" not in checked.err


def test_check_finds_a_missing_base_image_and_runtime(
    rfs: Rfs, tmp_path: Path, engine_toml: str
) -> None:
    missing = 'image = { name = "rfs-test/no-such-image", tag = "1" }\n'
    pkg = write_package(
        tmp_path / "pkg",
        f'[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}{missing}oci_runtime = "crun-x"\n',
    )
    checked = rfs("check", pkg)
    assert checked.code == 3, checked.err  # the script is fine; the machine is not
    found = findings(checked)
    assert "rfs-test/no-such-image:1" in found["container.image"]
    assert "'crun-x'" in found["container.oci_runtime"]
    ok = write_package(
        tmp_path / "ok", f"[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}{IMAGE}"
    )
    fine = rfs("dry-run", ok)
    assert fine.code == 0 and "ok (0 command(s)" in fine.out, fine.err


def test_check_without_an_engine_and_with_a_bad_archive(plain_rfs: Rfs, tmp_path: Path) -> None:
    rfs = plain_rfs
    pkg = write_package(
        tmp_path / "pkg",
        '[filesystem]\nsize_mib = 16\n[container]\narchive = "/base.tar"\n',
        {"base.tar": "not a tar"},
    )
    checked = rfs("check", pkg, env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert checked.code == 3
    found = findings(checked)
    assert "not a readable tar archive" in found["container.archive"]
    assert (
        "cannot reach the Docker engine at unix:///nonexistent/docker.sock"
        in found["container.engine"]
    )
    ssh = write_package(
        tmp_path / "ssh",
        "[filesystem]\nsize_mib = 16\n[container]\n"
        f'{IMAGE}connection_uri = "ssh://nobody@127.0.0.1:1"\n',
    )
    checked = rfs("check", ssh)
    assert checked.code == 3 and "container.connection_uri" in findings(checked)
    assert "Traceback" not in checked.err


# -- the Debian example ------------------------------------------------------------------------


@pytest.mark.slow
def test_debian_example_keeps_its_resolv_conf_overlay(
    rfs: Rfs, docker_engine: Engine, engine_kind: str, tmp_path: Path
) -> None:
    example = Path(__file__).parents[2] / "examples" / "debian"
    pkg = tmp_path / "debian"
    shutil.copytree(example, pkg)
    toml = pkg / "build.toml"
    toml.write_text(
        toml.read_text().replace('engine = "Docker"', f'engine = "{engine_kind.capitalize()}"')
    )
    if docker_engine.image_id("docker.io/library/debian:bookworm-slim") is None:
        pytest.skip("debian:bookworm-slim is not in the engine: run scripts/make-base-images.sh")
    out = tmp_path / "debian.ext4"
    built = rfs("build", pkg, "-o", out)
    assert built.code == 0, built.err[-3000:]
    t = list_ext4(out)
    assert text(out, t, "/etc/resolv.conf") == (
        "nameserver 8.8.8.8\nnameserver 8.8.4.4\nnameserver 1.1.1.1\n"
    )
    assert text(out, t, "/etc/hostname") == "rfs-debian\n"
    assert t["/tmp"].mode & 0o7777 == 0o1777
    assert "/usr/bin/systemctl" in t and "/usr/bin/ping" in t
