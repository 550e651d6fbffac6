"""Boot an image under QEMU with its serial console on this terminal, or as a check that waits
for a line of the console (`expect`).

The image's architecture (`--arch`, else its /sbin/init's: `rfs.vm.machines`) picks the QEMU
machine. The kernel comes from the command line or the newest vmlinuz-* of that machine's boot
directory (/boot for amd64), with its initrd (Debian's cloud kernel loads virtio_blk from it).
A guest of another architecture than the host's is always emulated (TCG). Otherwise KVM is used
when /dev/kvm works, which a short probe decides: on some hosts (nested virtualisation) KVM
guests hang after the first kernel lines, so the probe boots the kernel without a disk and waits
for it to reach the point where it looks for its root filesystem; otherwise QEMU emulates the
CPU (TCG, `-cpu max`), which boots a systemd Debian image in about 20 s (an arm64 one in about
40 s). The image is attached as a snapshot unless `write` is set, so a
check never changes the build's output (nor the cache's record of it). The VM is always killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rfs.errors import EnvironmentProblem, RfsError, UsageError
from rfs.host import proc
from rfs.host.emulation import host_architecture
from rfs.vm.machines import Machine, default_arch, machine_for

KVM_PROBE_S = 15.0
# What a kernel without a root disk prints once its early boot is done (the probe's goal).
_PROBE_DONE = re.compile(rb"VFS: Cannot open root device|Kernel panic|Unable to mount root")

# Filesystem magics: (offset, bytes) -> the kernel's name and whether it mounts read-write.
_MAGICS: list[tuple[int, bytes, str, bool]] = [
    (1080, b"\x53\xef", "ext4", True),
    (0, b"hsqs", "squashfs", False),
    (1024, b"\xe2\xe1\xf5\xe0", "erofs", False),
    (0x10040, b"_BHRfS_M", "btrfs", True),
    (0, b"XFSB", "xfs", True),
    (82, b"FAT32   ", "vfat", True),
    (54, b"FAT1", "vfat", True),
]


class BootFailed(RfsError):
    """The VM did not print what was expected in time, or QEMU failed."""


@dataclass
class BootSpec:
    """What to boot and how."""

    image: Path
    kernel: Path | None = None
    initrd: Path | None = None
    memory_mib: int = 512
    cpus: int = 1
    append: str = ""  # extra kernel command line
    accel: str = "auto"  # "auto", "kvm" or "tcg"
    arch: str | None = None  # "amd64", "arm64"; None: the image's (rfs.vm.machines)
    write: bool = False  # write to the image (else a snapshot)
    extra_qemu: list[str] = field(default_factory=list)


def find_kernel(
    boot_dir: Path = Path("/boot"), get_one: str = "apt-get install linux-image-cloud-amd64"
) -> tuple[Path, Path | None]:
    """The newest vmlinuz under `boot_dir` and its initrd (None when there is none); `get_one`
    says how to get one when there is none."""
    kernels = sorted(boot_dir.glob("vmlinuz-*"), key=lambda p: _version_key(p.name[8:]))
    if not kernels:
        raise EnvironmentProblem(
            f"no kernel given and none found in {boot_dir}",
            hint=f"pass --kernel VMLINUZ (and --initrd), or {get_one}",
        )
    kernel = kernels[-1]
    version = kernel.name[len("vmlinuz-") :]
    for name in (f"initrd.img-{version}", f"initramfs-{version}.img"):
        if (boot_dir / name).is_file():
            return kernel, boot_dir / name
    return kernel, None


def _version_key(text: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", text)]


def image_type(image: Path) -> tuple[str, bool]:
    """The image's filesystem (by its magic) and whether it can be mounted read-write."""
    try:
        with image.open("rb") as f:
            head = f.read(0x10048)
    except OSError as exc:
        raise UsageError(f"cannot read the image {image}: {exc}") from exc
    for offset, magic, name, writable in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name, writable
    raise UsageError(
        f"{image} holds no filesystem rfs knows (ext4, squashfs, erofs, btrfs, xfs, vfat)"
    )


def kvm_usable(
    machine: Machine, kernel: Path, initrd: Path | None, timeout_s: float = KVM_PROBE_S
) -> bool:
    """True when a KVM guest gets through early boot here (see the module doc)."""
    if machine.arch != host_architecture() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        *_qemu_base(machine, "kvm", 256, 1),
        "-kernel",
        str(kernel),
        "-append",
        f"console={machine.console} panic=-1 root=/dev/nonexistent",
    ]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    found, _ = _watch(argv, _PROBE_DONE, timeout_s, echo=None)
    return found


def _qemu_base(machine: Machine, accel: str, memory_mib: int, cpus: int) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"
    return [
        machine.qemu_path(),
        *machine.machine_args(accel),
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        str(memory_mib),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-nodefaults",
    ]


def qemu_argv(
    spec: BootSpec, accel: str, kernel: Path, initrd: Path | None, machine: Machine | None = None
) -> list[str]:
    """The QEMU command line that boots `spec` with `accel` ("kvm" or "tcg") on `machine`
    (default: the one of `spec.arch`, else amd64)."""
    machine = machine or machine_for(spec.arch or "amd64")
    fs_name, writable = image_type(spec.image)
    mode = "rw" if writable else "ro"
    cmdline = f"root=/dev/vda {mode} rootfstype={fs_name} console={machine.console} panic=-1"
    if spec.append:
        cmdline += " " + spec.append
    drive = f"file={spec.image},format=raw,if=virtio"
    if not spec.write:
        drive += ",snapshot=on"
    elif not writable:
        drive += ",readonly=on"
    argv = _qemu_base(machine, accel, spec.memory_mib, spec.cpus)
    argv += ["-kernel", str(kernel), "-append", cmdline, "-drive", drive]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    return argv + spec.extra_qemu


def choose_accel(
    spec: BootSpec,
    machine: Machine,
    kernel: Path,
    initrd: Path | None,
    log: Callable[[str], None],
) -> str:
    """ "kvm" or "tcg", as asked, or (auto) by probing KVM; always "tcg" for a guest of
    another architecture than the host's."""
    foreign = machine.arch != host_architecture()
    if spec.accel == "kvm" and foreign:
        raise UsageError(
            f"--accel kvm: KVM cannot run an {machine.arch} guest on this "
            f"{host_architecture()} host (use --accel tcg or auto)"
        )
    if spec.accel in ("kvm", "tcg"):
        return spec.accel
    if foreign:
        log(f"rfs: emulating the {machine.arch} CPU (TCG), which is slower")
        return "tcg"
    if kvm_usable(machine, kernel, initrd):
        return "kvm"
    log("rfs: KVM is missing or hangs here: emulating the CPU (TCG), which is slower")
    return "tcg"


def boot(
    spec: BootSpec,
    *,
    expect: str | None = None,
    timeout_s: float = 120.0,
    echo: Callable[[bytes], None] | None = None,
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> float:
    """Boot `spec`. With `expect`, watch the console (passed to `echo`) until it shows that
    text, then stop the VM and return the seconds it took; raise BootFailed after `timeout_s`.
    Without it, attach QEMU to this terminal until the guest powers off."""
    if not spec.image.is_file():
        raise UsageError(f"no image at {spec.image}")
    if spec.arch is not None:
        machine = machine_for(spec.arch)
    else:
        arch, source = default_arch(spec.image, image_type(spec.image)[0])
        machine = machine_for(arch)
        log(f"rfs: booting as {machine.arch} ({source}; --arch to choose)")
    machine.qemu_path()  # missing QEMU: say so before looking for a kernel
    kernel, initrd = spec.kernel, spec.initrd
    if kernel is None:
        kernel, found_initrd = find_kernel(machine.boot_dir, machine.kernel_hint)
        initrd = initrd or found_initrd
    for path in (kernel, initrd):
        if path is not None and not os.access(path, os.R_OK):
            raise EnvironmentProblem(
                f"cannot read {path}", hint="Debian's /boot/vmlinuz-* are readable by root only"
            )
    accel = choose_accel(spec, machine, kernel, initrd, log)
    argv = qemu_argv(spec, accel, kernel, initrd, machine)
    log(f"rfs: booting {spec.image} with {kernel.name} ({accel})")
    if expect is None:
        process = proc.popen(argv, stdin=None, stdout=None, stderr=None)
        with _killed(process):
            process.wait()
        return 0.0
    t0 = time.monotonic()
    found, tail = _watch(argv, re.compile(re.escape(expect.encode())), timeout_s, echo)
    if not found:
        raise BootFailed(
            f"{expect!r} did not appear on the console within {timeout_s:g} s; "
            f"its last lines:\n{tail}"
        )
    return time.monotonic() - t0


@contextlib.contextmanager
def _killed(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Whatever happens, the VM does not outlive the block."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _watch(
    argv: list[str],
    pattern: re.Pattern[bytes],
    timeout_s: float,
    echo: Callable[[bytes], None] | None,
) -> tuple[bool, str]:
    """Run QEMU until its console matches `pattern` or `timeout_s` passes; always kill it."""
    process = proc.popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    with _killed(process), selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(min(left, 1.0)):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:  # QEMU exited
                break
            if echo is not None:
                echo(chunk)
            seen = (seen + chunk)[-65536:]
            if pattern.search(seen):
                return True, ""
    text = seen.decode("utf-8", "replace").replace("\r", "")
    return False, "\n".join(text.splitlines()[-15:])
