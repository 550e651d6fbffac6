"""The Debian example boots: `rfs build examples/debian`, then `rfs boot --expect` with Debian's
linux-image-cloud-amd64 kernel and initrd (virtio_blk is a module there) until systemd's getty
shows the serial-console login prompt. That one is slow (a build with apt, then a boot that is
emulated where KVM does not work): run with --run-slow or RFS_RUN_SLOW=1.

The arm64 one builds a linux/arm64 package on the local arm64 Debian base (systemd, udev:
scripts/make-base-images.sh --arm64-debian), its command run under qemu-user, and boots it
with no --arch nor --kernel: rfs reads the image's architecture and takes the arm64 kernel of
scripts/arm64-kernel.sh, under qemu-system-aarch64 emulating the CPU, to the login prompt of
the serial console ttyAMA0. Slow too (about 40 s of boot on an idle host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import EnvironmentProblem
from rfs.host.emulation import cannot_run, host_architecture
from rfs.vm.machines import machine_for
from rfs.vm.qemu import find_kernel
from tests.conftest import require_or_skip
from tests.constants import DEBIAN_ARM64
from tests.packages import write_package

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


ARM64_SCRIPT = f"""\
[filesystem]
type = "Ext4"
size_mib = 512

[container]
engine = "Docker"
image = {{ name = "{DEBIAN_ARM64.split(":")[0]}", tag = "{DEBIAN_ARM64.split(":")[1]}" }}
platform = "linux/arm64"

[[commands]]
command = "passwd -d root"

[[overlays]]
source_inline = "rfs-arm64\\n"
destination = "/etc/hostname"
"""


@pytest.mark.slow
def test_an_arm64_debian_boots_to_the_login_prompt(tmp_path: Path, docker_client: Any) -> None:
    if host_architecture() != "amd64":
        pytest.skip("written for an amd64 host")
    try:
        docker_client.images.get(DEBIAN_ARM64)
        find_kernel(machine_for("arm64").boot_dir)
        machine_for("arm64").qemu_path()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    except Exception:
        require_or_skip(
            f"{DEBIAN_ARM64} is missing: run scripts/make-base-images.sh --arm64-debian"
        )
    why = cannot_run("arm64")
    if why is not None:
        require_or_skip(f"{why}: run scripts/setup-host.sh")
    env = {**os.environ, "RFS_CACHE_DIR": str(tmp_path / "cache")}
    pkg = write_package(tmp_path / "pkg", ARM64_SCRIPT)
    image = tmp_path / "arm64.ext4"
    rfs = [sys.executable, "-m", "rfs"]
    try:
        _build_and_boot_arm64(rfs, pkg, image, env)
    finally:  # the build's layer tags
        cleared = subprocess.run([*rfs, "cache", "clear"], env=env, capture_output=True)
        assert cleared.returncode == 0, cleared.stderr


def _build_and_boot_arm64(rfs: list[str], pkg: Path, image: Path, env: dict[str, str]) -> None:
    t0 = time.monotonic()
    built = subprocess.run(
        [*rfs, "build", str(pkg), "-o", str(image), "-q"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    t1 = time.monotonic()
    booted = subprocess.run(
        [*rfs, "boot", str(image), "--expect", "login:", "--timeout", "300"],
        capture_output=True,
        env=env,
        check=False,
    )
    console = booted.stdout.decode("utf-8", "replace")
    said = booted.stderr.decode("utf-8", "replace")
    assert booted.returncode == 0, console[-3000:] + said
    assert "booting as arm64 (the ELF machine of its /sbin/init" in said
    assert "vmlinuz-" in said and "cloud-arm64 (tcg)" in said
    assert "Booting Linux on physical CPU" in console  # arm64's first kernel line
    assert "Debian GNU/Linux 12 rfs-arm64 ttyAMA0" in console
    assert "rfs-arm64 login:" in console
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
