"""Faults on the real engine: a failing command, a timeout, the engine down or dying, Ctrl-C
and SIGTERM at every stage, a full disk, a damaged cache.

Every scenario runs the `rfs` command as a separate process with its own $TMPDIR, cache, output
directory and run id (RFS_RUN_ID, the value of every container's `org.rfs.run` label), and then
`assert_clean` checks that nothing is left: no container of that run, nothing in $TMPDIR (scratch
directories `rfs-step-*`, `rfs-mke2fs-*`, unpacked packages), nothing in the cache's tmp/, no
`.<image>.rfs-tmp-*` next to the output, no mount under the test's directory, and that the output
is either absent or exactly the previous complete image. Then the next build must succeed and
reuse what was cached before the fault.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cachefiles import blobs, export_blob
from tests.conftest import require_or_skip
from tests.constants import BUSYBOX
from tests.packages import build_toml, write_package
from tests.rfsrun import IsolatedRfs, besides_overlays, identity

pytestmark = pytest.mark.integration

# The size of the file the "big" package's command writes: big enough that its export and its
# assembly take a second or more (time to interrupt them), small enough to stay quick.
BIG_MIB = 200


@pytest.fixture
def rfs(tmp_path: Path, api: Any) -> IsolatedRfs:
    return IsolatedRfs(tmp_path, api)


# -- a command that fails; a command that times out ------------------------------------------


def test_failing_command(rfs: IsolatedRfs, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    good = ['command = "mkdir -p /srv/one"', 'command = "touch /srv/one/two"']
    pkg = write_package(tmp_path / "pkg", build_toml(marker, [*good, 'command = "ls /nope"']))
    out = tmp_path / "out" / "image.ext4"
    out.parent.mkdir()

    failed = rfs.run("build", pkg, "-o", out)
    assert failed.code == 1, failed.err
    assert (
        "rfs: error: step run[2] (commands[2] command: ls /nope) failed: exited with code 1"
        in failed.err
    )
    assert "/nope" in failed.err  # the command's own message, from the output's tail
    rfs.assert_clean(failed, out, None)

    fixed = write_package(pkg, build_toml(marker, [*good, 'command = "true"']))
    again = rfs.run("build", fixed, "-o", out)
    assert again.code == 0, again.err
    # run[0], run[1] reused
    assert sorted(besides_overlays(again, failed)) == ["assemble", "diff[2]", "run[2]"]


def test_command_exceeding_timeout(rfs: IsolatedRfs, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    first = 'command = "touch /first"'
    slow = build_toml(
        marker,
        [first, 'script_inline = "echo started; sleep 60"'],
        container="timeout = 2\nwait_timeout_s = 1",
    )
    pkg = write_package(tmp_path / "pkg", slow)
    out = tmp_path / "image.ext4"

    t0 = time.monotonic()
    failed = rfs.run("build", pkg, "-o", out)
    assert time.monotonic() - t0 < 30, "the timeout did not stop the command"
    assert failed.code == 1, failed.err
    assert "step run[1]" in failed.err and "timed out after 2 s" in failed.err
    assert "started" in failed.err  # what it printed before it was stopped
    rfs.assert_clean(failed, out, None)

    quick = build_toml(
        marker,
        [first, 'script_inline = "echo started; sleep 0.1"'],
        container="timeout = 2\nwait_timeout_s = 1",
    )
    again = rfs.run("build", write_package(pkg, quick), "-o", out)
    assert again.code == 0, again.err
    assert sorted(besides_overlays(again, failed)) == ["assemble", "diff[1]", "run[1]"]


# -- the engine not running --------------------------------------------------------------------


def test_engine_not_running(rfs: IsolatedRfs, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    pkg = write_package(tmp_path / "pkg", build_toml(marker, ['command = "touch /x"']))
    out = tmp_path / "image.ext4"
    built = rfs.run("build", pkg, "-o", out)
    assert built.code == 0, built.err
    image = identity(out)

    dead = tmp_path / "dead.sock"  # a socket file nobody listens on: connection refused
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))
    # Through DOCKER_HOST, and through the script's connection_uri (no such socket).
    via_env = rfs.run("build", pkg, "-o", out, extra_env={"DOCKER_HOST": f"unix://{dead}"})
    assert via_env.code == 3, via_env.err
    assert f"cannot reach the Docker engine at unix://{dead}: connection refused" in via_env.err
    assert "is dockerd running?" in via_env.err
    rfs.assert_clean(via_env, out, image)

    nowhere = tmp_path / "nowhere.sock"
    uri_pkg = write_package(
        tmp_path / "pkg2",
        build_toml(
            marker, ['command = "touch /x"'], container=f'connection_uri = "unix://{nowhere}"'
        ),
    )
    via_uri = rfs.run("build", uri_pkg, "-o", out)
    assert via_uri.code == 3, via_uri.err
    assert f"unix://{nowhere}: no such socket" in via_uri.err
    rfs.assert_clean(via_uri, out, image)

    again = rfs.run("build", pkg, "-o", out)
    assert again.code == 0, again.err
    assert again.ran() == []  # everything was still cached
    assert identity(out) == image


# -- signals during a command ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT-to-group", "SIGTERM-to-rfs"],
)
def test_interrupt_during_command(rfs: IsolatedRfs, tmp_path: Path, sig: int, group: bool) -> None:
    marker = uuid.uuid4().hex
    first = 'command = "touch /first"'
    pkg = write_package(
        tmp_path / "pkg", build_toml(marker, [first, 'script_inline = "echo started; sleep 60"'])
    )
    out = tmp_path / "image.ext4"

    stopped = rfs.interrupt(
        ["build", pkg, "-o", out], lambda err: "run[1] | started" in err, sig, group=group
    )
    assert stopped.code == 130, stopped.err
    name = signal.Signals(sig).name
    # overlays (see besides_overlays) and diff[0] run beside run[1]: finished or not
    assert {"run[0]"} <= set(stopped.ran()) - {"overlays"} <= {"run[0]", "diff[0]"}
    assert stopped.last_line == (
        f"rfs: interrupted by {name} during run[1]: {len(stopped.ran())} step(s) "
        "finished and are cached; nothing half-done was kept"
    )
    rfs.assert_clean(stopped, out, None)

    quick = build_toml(marker, [first, 'script_inline = "echo started"'])
    again = rfs.run("build", write_package(pkg, quick), "-o", out)
    assert again.code == 0, again.err
    again_ran = [step for step in besides_overlays(again, stopped) if step != "diff[0]"]
    assert sorted(again_ran) == ["assemble", "diff[1]", "run[1]"]


def test_sigterm_to_a_build_of_a_package_tarball(rfs: IsolatedRfs, tmp_path: Path) -> None:
    """A package tarball is unpacked under $TMPDIR for the build; SIGTERM removes it too."""
    import tarfile

    marker = uuid.uuid4().hex
    pkg = write_package(tmp_path / "pkg", build_toml(marker, ['script_path = "/slow.sh"']))
    (pkg / "slow.sh").write_text("#!/bin/sh\necho started\nsleep 60\n")
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("build.toml", "slow.sh"):
            tar.add(pkg / name, arcname=name)
    out = tmp_path / "image.ext4"
    stopped = rfs.interrupt(
        ["build", archive, "-o", out],
        lambda err: "run[0] | started" in err,
        signal.SIGTERM,
        group=False,
    )
    assert stopped.code == 130, stopped.err
    assert stopped.last_line.startswith("rfs: interrupted by SIGTERM during run[0]")
    rfs.assert_clean(stopped, out, None)  # $TMPDIR empty: no rfs-package-* left


def test_containers_of_a_killed_build_are_removed_by_the_next(
    rfs: IsolatedRfs, tmp_path: Path
) -> None:
    """SIGKILL skips every clean-up: the container stays until the next build removes it."""
    marker = uuid.uuid4().hex
    pkg = write_package(
        tmp_path / "pkg", build_toml(marker, ['script_inline = "echo started; sleep 60"'])
    )
    out = tmp_path / "image.ext4"
    killed = rfs.interrupt(
        ["build", pkg, "-o", out],
        lambda err: "run[0] | started" in err,
        signal.SIGKILL,
        group=False,
    )
    assert killed.code == -signal.SIGKILL
    assert len(rfs.containers(killed.run_id)) == 1  # what a killed build leaves
    (scratch,) = rfs.tmpdir.glob("rfs-step-*")  # and its scratch directory

    # Another build (any package) removes it; a running build's containers stay.
    other = write_package(
        tmp_path / "other",
        build_toml(uuid.uuid4().hex, ['script_inline = "echo started; sleep 60"']),
    )
    alive = rfs.start("build", other, "-o", tmp_path / "other.ext4")
    try:
        alive.wait_for(lambda err: "run[0] | started" in err)
        quick = write_package(tmp_path / "quick", build_toml(marker, ['command = "true"']))
        cleaner = rfs.run("build", quick, "-o", tmp_path / "quick.ext4")
        assert cleaner.code == 0, cleaner.err
        assert rfs.containers(killed.run_id) == [] and not scratch.exists()
        # A live build's container and scratch directory are not touched.
        assert len(rfs.containers(alive.run_id)) == 1
        assert len(list(rfs.tmpdir.glob("rfs-step-*"))) == 1
    finally:
        os.killpg(alive.proc.pid, signal.SIGINT)
        stopped = alive.finish()
    rfs.assert_clean(stopped, tmp_path / "other.ext4", None)


# -- a big image: signals during export and assembly, a full disk ------------------------------


@dataclass
class Big:
    """A package whose only layer holds BIG_MIB MiB, built once; its cache and image."""

    rfs: IsolatedRfs
    pkg: Path
    out: Path
    marker: str

    def rewrite(self, overlay: str, *, size_mib: int = BIG_MIB * 2) -> None:
        """A new overlay value: the image must be assembled again (the layer stays cached)."""
        cmd = f'command = "dd if=/dev/urandom of=/big bs=1M count={BIG_MIB}"'
        write_package(self.pkg, build_toml(self.marker, [cmd], size_mib=size_mib, overlay=overlay))

    def drop_export(self) -> None:
        """Delete the export tarball (not its record): the next build must export again. (The
        one command's change is big: its diff step exports its layer whole.)"""
        export_blob(self.rfs.cache).unlink()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, api: Any) -> Big:
    base = tmp_path_factory.mktemp("big")
    b = Big(IsolatedRfs(base, api), base / "pkg", base / "out" / "image.ext4", uuid.uuid4().hex)
    b.out.parent.mkdir()
    b.rewrite("zero")
    built = b.rfs.run("build", b.pkg, "-o", b.out, "-q")
    assert built.code == 0, built.err
    return b


def _part_growing(cache: Path) -> Callable[[str], bool]:
    def when(_: str) -> bool:
        return any(p.stat().st_size > 0 for p in (cache / "tmp").glob("part-*"))

    return when


def _image_tmp(out: Path) -> Callable[[str], bool]:
    return lambda _: any(out.parent.glob(f".{out.name}.rfs-tmp-*"))


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT-to-group", "SIGTERM-to-rfs"],
)
def test_interrupt_during_export(big: Big, sig: int, group: bool) -> None:
    big.rewrite(uuid.uuid4().hex)
    big.drop_export()
    before = identity(big.out)
    stopped = big.rfs.interrupt(
        ["build", big.pkg, "-o", big.out, "-q"], _part_growing(big.rfs.cache), sig, group=group
    )
    assert stopped.code == 130, stopped.err
    name = signal.Signals(sig).name
    finished = "1 step(s) finished and are cached" if stopped.ran() else "no step finished"
    assert stopped.ran() in ([], ["overlays"])  # overlays: see besides_overlays
    assert stopped.last_line == (
        f"rfs: interrupted by {name} during diff[0]: {finished}; nothing half-done was kept"
    )
    big.rfs.assert_clean(stopped, big.out, before)

    again = big.rfs.run("build", big.pkg, "-o", big.out, "-q")
    assert again.code == 0, again.err
    assert besides_overlays(again, stopped) == ["diff[0]", "assemble"]  # the layer was reused


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT-to-group", "SIGTERM-to-rfs"],
)
def test_interrupt_during_assembly(big: Big, sig: int, group: bool) -> None:
    big.rewrite(uuid.uuid4().hex)
    # Touched: the output is no longer the image rfs wrote, so the base image is copied to a
    # temporary file rather than patched in place (test_inplace_edits interrupts that route).
    os.utime(big.out)
    before = identity(big.out)
    stopped = big.rfs.interrupt(
        ["build", big.pkg, "-o", big.out, "-q"], _image_tmp(big.out), sig, group=group
    )
    assert stopped.code == 130, stopped.err
    name = signal.Signals(sig).name
    assert stopped.last_line == (
        f"rfs: interrupted by {name} during assemble: 1 step(s) "
        "finished and are cached; nothing half-done was kept"
    )
    big.rfs.assert_clean(stopped, big.out, before)  # the previous image, untouched

    again = big.rfs.run("build", big.pkg, "-o", big.out, "-q")
    assert again.code == 0, again.err
    assert again.ran() == ["assemble"]  # the export and the overlays were reused
    subprocess.run(["e2fsck", "-fn", str(big.out)], check=True, capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB mounted at `path` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        require_or_skip("a full disk is simulated with a tmpfs mount, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_while_exporting(big: Big) -> None:
    """The cache on a disk too small for the export: exit 3, no partial blob, then, with
    room, the same cache finishes the build and the layer is reused."""
    big.rewrite(uuid.uuid4().hex)
    with small_disk(big.rfs.base / "mnt" / "cache", BIG_MIB // 2) as disk:
        cache = disk / "rfs"
        shutil.copytree(big.rfs.cache / "index", cache / "index")  # the layer's record
        before = identity(big.out)
        full = big.rfs.run("build", big.pkg, "-o", big.out, "-q", "--cache-dir", cache)
        assert full.code == 3, full.err
        assert "rfs: error:" in full.err and "No space left on device" in full.err
        big.rfs.assert_clean(full, big.out, before)
        assert sorted(os.listdir(cache / "tmp")) == [] and os.listdir(cache / "blobs") == []

        subprocess.run(["mount", "-o", f"remount,size={BIG_MIB * 3}m", str(disk)], check=True)
        again = big.rfs.run("build", big.pkg, "-o", big.out, "-q", "--cache-dir", cache)
        assert again.code == 0, again.err
        assert besides_overlays(again, full) == ["diff[0]", "assemble"]


def test_disk_full_while_assembling(big: Big) -> None:
    """The output on a disk with room for one image but not two: the new image cannot be
    written beside the old one; the old one stays, whole, and no temporary file remains."""
    with small_disk(big.rfs.base / "mnt" / "out", BIG_MIB * 3 // 2) as disk:
        out = disk / "image.ext4"
        big.rewrite(uuid.uuid4().hex)
        first = big.rfs.run("build", big.pkg, "-o", out, "-q")
        assert first.code == 0, first.err
        inode = out.stat().st_ino
        big.rewrite(uuid.uuid4().hex)
        in_place = big.rfs.run("build", big.pkg, "-o", out, "-q")
        assert in_place.code == 0, in_place.err  # patched in place: no second image needed
        assert out.stat().st_ino == inode
        os.utime(out)  # no longer the image rfs wrote: the base image is copied beside it
        before = identity(out)
        big.rewrite(uuid.uuid4().hex)
        full = big.rfs.run("build", big.pkg, "-o", out, "-q")
        assert full.code == 3, full.err
        assert "no space left on the disk that holds the image" in full.err
        big.rfs.assert_clean(full, out, before)
        subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)

        out.unlink()  # room again
        again = big.rfs.run("build", big.pkg, "-o", out, "-q")
        assert again.code == 0, again.err
        assert again.ran() == ["assemble"]


# -- a damaged cache ---------------------------------------------------------------------------


def test_corrupt_export_is_exported_again_in_the_same_build(
    rfs: IsolatedRfs, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    cmd = 'command = "touch /x"'
    pkg = write_package(tmp_path / "pkg", build_toml(marker, [cmd], overlay="one"))
    out = tmp_path / "image.ext4"
    assert rfs.run("build", pkg, "-o", out).code == 0
    (blob,) = blobs(rfs.cache, "diff")  # what the command changed, laid on the base's export

    # Same size, other bytes: only the content hash can tell.
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    write_package(pkg, build_toml(marker, [cmd], overlay="two"))
    plan = rfs.run("plan", pkg, "-o", out)
    assert "export tarball is corrupt" in plan.out, plan.out
    healed = rfs.run("build", pkg, "-o", out)
    assert healed.code == 0, healed.err
    assert besides_overlays(healed) == ["diff[0]", "assemble"]  # run[0] reused
    assert "export tarball is corrupt" in healed.err
    rfs.assert_clean(healed, out, identity(out))

    # Cut short: a cheaper check (the size) finds it.
    with blob.open("r+b") as f:
        f.truncate(blob.stat().st_size // 2)
    write_package(pkg, build_toml(marker, [cmd], overlay="three"))
    again = rfs.run("build", pkg, "-o", out)
    assert again.code == 0, again.err
    assert besides_overlays(again) == ["diff[0]", "assemble"]


def test_damaged_base_image_is_made_again(rfs: IsolatedRfs, tmp_path: Path) -> None:
    """The ext4 base image an overlay edit copies is checked first: a damaged one is dropped
    and made again from the export, and the image is right."""
    marker = uuid.uuid4().hex
    pkg = write_package(tmp_path / "pkg", build_toml(marker, ['command = "touch /x"']))
    out = tmp_path / "image.ext4"
    assert rfs.run("build", pkg, "-o", out).code == 0
    (base,) = blobs(rfs.cache, "ext4-base")
    original = base.read_bytes()
    # A flipped byte in a data extent (the superblock's block), same size and sparseness.
    with base.open("r+b") as f:
        f.seek(1024 + 0x78)  # s_volume_name: harmless to a kernel, fatal to the digest
        f.write(b"X")
    write_package(pkg, build_toml(marker, ['command = "touch /x"'], overlay="edited"))
    healed = rfs.run("build", pkg, "-o", out)
    assert healed.code == 0, healed.err
    assert healed.ran() == ["overlays", "assemble"]
    assert "(cached base image + debugfs (" in healed.err
    (again,) = blobs(rfs.cache, "ext4-base")
    assert again.read_bytes() == original  # made again, byte for byte
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
    assert (
        b"edited"
        in subprocess.run(
            ["debugfs", "-R", "cat /etc/overlay", str(out)], check=True, capture_output=True
        ).stdout
    )


def test_damaged_cache_index_is_started_afresh(rfs: IsolatedRfs, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    pkg = write_package(tmp_path / "pkg", build_toml(marker, ['command = "touch /x"']))
    out = tmp_path / "image.ext4"
    assert rfs.run("build", pkg, "-o", out).code == 0
    db = rfs.cache / "index" / "cache.db"
    db.write_bytes(b"this is not a database" * 100)

    rebuilt = rfs.run("build", pkg, "-o", out)
    assert rebuilt.code == 0, rebuilt.err
    assert "cache index" in rebuilt.err and "damaged" in rebuilt.err
    assert sorted(besides_overlays(rebuilt)) == ["assemble", "diff[0]", "run[0]"]
    again = rfs.run("build", pkg, "-o", out)
    assert (again.code, again.ran()) == (0, [])


# -- the engine dying in the middle of a build (a private dockerd) -----------------------------


class PrivateDockerd:
    """A second dockerd with its own data root, exec root, pid file and socket: this test may
    kill it, which it must never do to the shared one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.uri = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import docker

        # In a network namespace of its own: a dockerd started with --bridge=none deletes any
        # interface named docker0 it can see, which would be the shared daemon's bridge.
        argv = [
            "unshare",
            "--net",
            shutil.which("dockerd") or "dockerd",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "pid"),
            "-H",
            self.uri,
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--log-level=warn",
        ]
        log = (self.root / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        api = docker.APIClient(base_url=self.uri, version="1.40", timeout=5)
        deadline = time.monotonic() + 60
        while True:
            try:
                api.ping()
                break
            except Exception:  # not up yet
                assert self.proc.poll() is None, (self.root / "dockerd.log").read_text()
                assert time.monotonic() < deadline, "the private dockerd did not come up"
                time.sleep(0.1)
        api.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to stop its containers. Its containerd goes
        too (else the restarted dockerd cannot start its own); the containers' shims stay."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._kill_containerd()

    def _kill_containerd(self) -> None:
        # dockerd started its own containerd under the exec root. Whether or not it outlived
        # dockerd, its pid file must go: a restarted dockerd that finds the pid taken by
        # another process waits for a containerd that never answers.
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if str(self.root) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)

    def kill_leftovers(self) -> None:
        """SIGKILL what this daemon started and left running (containers' shims), by pid."""
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if str(self.root) in cmdline.read_text():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._kill_containerd()


@pytest.fixture(scope="module")
def private_dockerd(api: Any) -> Iterator[PrivateDockerd]:
    if shutil.which("dockerd") is None or shutil.which("unshare") is None or os.geteuid():
        require_or_skip("needs dockerd, unshare and root to run a second, private dockerd")
    import docker

    root = Path(tempfile.mkdtemp(prefix="rfsd-", dir="/tmp"))  # a short socket path
    daemon = PrivateDockerd(root)
    try:
        daemon.start()
        private = docker.APIClient(base_url=daemon.uri, version="1.40")
        private.load_image(api.get_image(BUSYBOX))
        private.close()
        yield daemon
    finally:
        daemon.stop()
        daemon.kill_leftovers()
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(root))
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_engine_killed_in_the_middle_of_a_command(
    private_dockerd: PrivateDockerd, tmp_path: Path
) -> None:
    import docker

    private = docker.APIClient(base_url=private_dockerd.uri, version="1.40")
    rfs = IsolatedRfs(tmp_path, private, engine_uri=private_dockerd.uri)
    marker = uuid.uuid4().hex
    first = 'command = "touch /first"'
    pkg = write_package(
        tmp_path / "pkg", build_toml(marker, [first, 'script_inline = "echo started; sleep 60"'])
    )
    out = tmp_path / "image.ext4"

    def at_second_command(err: str) -> bool:
        if "run[1] | started" not in err:
            return False
        private_dockerd.kill()
        return True

    dead = rfs.interrupt(
        ["build", pkg, "-o", out, "--no-network"], at_second_command, 0, group=False
    )  # signal 0: the daemon's death is the fault
    assert dead.code == 3, dead.err
    assert f"the Docker engine at {private_dockerd.uri}" in dead.err, dead.err
    assert dead.last_line == "rfs: hint: systemctl start docker"
    assert "rfs: error: cannot reach the Docker engine" in dead.err
    assert "Traceback" not in dead.err

    private_dockerd.start()  # it comes back with the dead build's container, stopped
    private = docker.APIClient(base_url=private_dockerd.uri, version="1.40")
    rfs.api = private
    assert len(rfs.containers(dead.run_id)) == 1
    quick = build_toml(marker, [first, 'script_inline = "echo started"'])
    again = rfs.run("build", write_package(pkg, quick), "-o", out, "--no-network")
    assert again.code == 0, again.err
    # run[0] reused
    # diff[0] ran beside run[1]: finished before the engine died, or now
    again_ran = [step for step in besides_overlays(again, dead) if step != "diff[0]"]
    assert sorted(again_ran) == ["assemble", "diff[1]", "run[1]"]
    rfs.assert_clean(dead, out, identity(out))  # and the next build removed its container
