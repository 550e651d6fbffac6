"""The Debian example boots: `rfs build examples/debian`, then `rfs boot --expect` with Debian's
linux-image-cloud-amd64 kernel and initrd (virtio_blk is a module there) until systemd's getty
shows the serial-console login prompt. That one is slow (a build with apt, then a boot that is
emulated where KVM does not work): run with --run-slow or RFS_RUN_SLOW=1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rfs.errors import EnvironmentProblem
from rfs.vm.qemu import find_kernel
from tests.conftest import require_or_skip

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "debian"


@pytest.mark.slow
def test_debian_example_boots_to_the_login_prompt(tmp_path: Path) -> None:
    try:
        kernel, initrd = find_kernel()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    if initrd is None or not os.access(kernel, os.R_OK):
        require_or_skip(f"{kernel} needs its initrd and read access (Debian: root)")
    env = {**os.environ, "RFS_CACHE_DIR": str(tmp_path / "cache")}
    image = tmp_path / "debian.ext4"
    t0 = time.monotonic()
    built = subprocess.run(
        [sys.executable, "-m", "rfs", "build", str(EXAMPLE), "-o", str(image), "-q", "--verify"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    t1 = time.monotonic()
    booted = subprocess.run(
        [
            sys.executable,
            "-m",
            "rfs",
            "boot",
            str(image),
            "--kernel",
            str(kernel),
            "--initrd",
            str(initrd),
            "--expect",
            "login:",
            "--timeout",
            "240",
        ],
        capture_output=True,
        env=env,
        check=False,
    )
    console = booted.stdout.decode("utf-8", "replace")
    assert booted.returncode == 0, console[-3000:] + booted.stderr.decode("utf-8", "replace")
    assert "Welcome to" in console and "Debian GNU/Linux 12" in console
    assert "rfs-debian login:" in console  # the hostname overlay, on ttyS0
    print(f"build {t1 - t0:.1f} s, boot to login {time.monotonic() - t1:.1f} s")


def test_expect_times_out_and_kills_the_vm(tmp_path: Path) -> None:
    """A text that never comes: exit 1 after the timeout, and no QEMU left running (quick:
    the VM is stopped after 5 s whatever it is doing)."""
    try:
        find_kernel()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    image = tmp_path / "empty.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", str(image), "16M"], check=True)
    t0 = time.monotonic()
    booted = subprocess.run(
        [
            sys.executable,
            "-m",
            "rfs",
            "boot",
            str(image),
            "--expect",
            "never printed",
            "--timeout",
            "5",
            "-q",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert booted.returncode == 1, booted.stderr
    assert "did not appear on the console within 5 s" in booted.stderr
    assert time.monotonic() - t0 < 60
    left = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64.*{image}"], capture_output=True, check=False
    )
    assert left.returncode == 1, left.stdout
