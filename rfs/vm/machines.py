"""The QEMU machine of each architecture `rfs boot` boots, and the architecture of an image.

amd64 images boot with `qemu-system-x86_64` (its default machine, console ttyS0) and the host's
/boot/vmlinuz-* (Debian's linux-image-cloud-amd64); arm64 ones with `qemu-system-aarch64 -M
virt` (console ttyAMA0; with `-kernel`, no UEFI firmware is needed) and the Debian
linux-image-cloud-arm64 kernel and initrd that scripts/arm64-kernel.sh puts in
`$RFS_ARM64_BOOT_DIR` (default /var/cache/rfs/boot/arm64), never in /boot, where the host's own
kernel is looked for.

An image's architecture is the ELF machine of its /sbin/init (or /bin/sh), read with debugfs,
which is why only ext4 images say theirs; the others boot as the host's architecture unless
`--arch` says otherwise.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import EnvironmentProblem, RfsError, UsageError
from rfs.host import proc
from rfs.host.emulation import elf_architecture, host_architecture

ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}
MACHINES = ("amd64", "arm64")  # the architectures rfs boots
_PROGRAMS = ("/sbin/init", "/bin/sh")
_MAX_LINKS = 40  # as the kernel's limit on nested symlinks


@dataclass(frozen=True)
class Machine:
    """How QEMU boots one architecture."""

    arch: str  # as engines name it: "amd64", "arm64"
    qemu: str  # the system emulator
    qemu_package: str  # the Debian package that holds it
    console: str  # the serial console's device name in the guest
    boot_dir: Path  # where the default kernel and initrd are looked for
    kernel_hint: str  # how to get that kernel

    def machine_args(self, accel: str) -> list[str]:
        """QEMU's -M for this architecture under `accel` (x86_64's default machine: none)."""
        if self.arch != "arm64":
            return []
        return ["-M", "virt,gic-version=host" if accel == "kvm" else "virt"]

    def qemu_path(self) -> str:
        """The emulator's path, or an EnvironmentProblem naming the package to install."""
        try:
            return proc.tool_path(self.qemu)
        except EnvironmentProblem as exc:
            raise EnvironmentProblem(
                f"{self.qemu} is not installed: it boots {self.arch} images",
                hint=f"apt-get install {self.qemu_package} (scripts/setup-host.sh installs it)",
            ) from exc


def arm64_boot_dir() -> Path:
    """Where scripts/arm64-kernel.sh puts the arm64 kernel and initrd."""
    return Path(os.environ.get("RFS_ARM64_BOOT_DIR", "/var/cache/rfs/boot/arm64"))


def machine_for(arch: str) -> Machine:
    """The machine that boots `arch` ("arm64", "aarch64", "amd64", "x86_64")."""
    arch = ALIASES.get(arch, arch)
    if arch == "amd64":
        return Machine(
            "amd64",
            "qemu-system-x86_64",
            "qemu-system-x86",
            "ttyS0",
            Path("/boot"),
            "apt-get install linux-image-cloud-amd64",
        )
    if arch == "arm64":
        return Machine(
            "arm64",
            "qemu-system-aarch64",
            "qemu-system-arm",
            "ttyAMA0",
            arm64_boot_dir(),
            "run scripts/arm64-kernel.sh of rfs's source (scripts/setup-host.sh does)",
        )
    raise UsageError(f"rfs boot knows no architecture {arch!r} (amd64 or arm64)")


def image_architecture(image: Path, fs_name: str) -> str | None:
    """The architecture of the ELF /sbin/init (else /bin/sh) in `image`, None when the image is
    not ext4, has neither, or they are of no machine rfs names."""
    if fs_name != "ext4":
        return None
    for program in _PROGRAMS:
        header = _ext4_head(image, program)
        if header is not None:
            return elf_architecture(header)
    return None


def default_arch(image: Path, fs_name: str) -> tuple[str, str]:
    """(architecture, where it came from) for an image booted without --arch."""
    found = image_architecture(image, fs_name)
    if found is not None:
        return found, "the ELF machine of its /sbin/init or /bin/sh"
    return host_architecture(), "the host's: the image's own is unknown"


def _debugfs(image: Path, request: str) -> bytes:
    """The output of one debugfs request on `image` (read-only; no pager)."""
    env = {"DEBUGFS_PAGER": "__none__", "PAGER": "cat"}
    argv = [proc.tool_path("debugfs"), "-R", request, str(image)]
    try:
        return proc.run(argv, env=env, what="debugfs").stdout
    except RfsError:
        return b""


def _ext4_head(image: Path, path: str) -> bytes | None:
    """The first 20 bytes of the file `path` in an ext4 image, following symlinks (debugfs
    follows those of the directories on the way, not the last one); None if it is missing."""
    for _ in range(_MAX_LINKS):
        stat = _debugfs(image, f"stat {_quoted(path)}").decode("utf-8", "replace")
        kind = re.search(r"Type: (\S+)", stat)
        if kind is None:
            return None
        if kind.group(1) != "symlink":
            return _debugfs(image, f"cat {_quoted(path)}")[:20]
        fast = re.search(r'Fast link dest: "(.*)"', stat)
        target = fast.group(1) if fast else _debugfs(image, f"cat {_quoted(path)}").decode()
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return None


def _quoted(path: str) -> str:
    """A path as one debugfs argument."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
