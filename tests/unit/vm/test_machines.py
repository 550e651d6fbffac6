"""rfs/vm/machines.py and the machine-dependent parts of rfs/vm/qemu.py: which QEMU, console and
kernel each architecture gets, and an image's architecture read from its ELF /sbin/init or
/bin/sh (through symlinks, as Debian's are) in real ext4 images made with mke2fs -d."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rfs.errors import EnvironmentProblem, UsageError
from rfs.host import proc
from rfs.host.emulation import elf_architecture, host_architecture
from rfs.vm import qemu
from rfs.vm.machines import default_arch, image_architecture, machine_for

AARCH64_HEAD = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x03\x00\xb7\x00"
X86_64_HEAD = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x03\x00\x3e\x00"


def ext4_of(tmp_path: Path, files: dict[str, bytes], links: dict[str, str]) -> Path:
    """An ext4 image holding `files` (path -> content) and `links` (path -> target)."""
    if shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin") is None:
        pytest.skip("mke2fs is not installed")
    tree = tmp_path / "tree"
    for path, data in files.items():
        (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / path.lstrip("/")).write_bytes(data + b"\x00" * 100)
    for path, target in links.items():
        (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / path.lstrip("/")).symlink_to(target)
    image = tmp_path / "root.ext4"
    mke2fs = proc.tool_path("mke2fs")
    subprocess.run([mke2fs, "-q", "-t", "ext4", "-d", str(tree), str(image), "8M"], check=True)
    return image


def test_elf_architecture_reads_the_machine_field() -> None:
    assert elf_architecture(AARCH64_HEAD) == "arm64"
    assert elf_architecture(X86_64_HEAD) == "amd64"
    assert elf_architecture(b"#!/bin/sh\n" + b"\x00" * 10) is None
    assert elf_architecture(AARCH64_HEAD[:10]) is None
    assert elf_architecture(AARCH64_HEAD[:18] + b"\xff\xff") is None


def test_a_debian_layout_is_followed_to_its_elf_file(tmp_path: Path) -> None:
    # usrmerge: /bin and /lib are links into /usr; /sbin/init is an absolute link, /bin/sh a
    # relative one, and systemd's binary sits behind both.
    image = ext4_of(
        tmp_path,
        {"/usr/lib/systemd/systemd": AARCH64_HEAD},
        {
            "/lib": "usr/lib",
            "/bin": "usr/bin",
            "/sbin": "usr/sbin",
            "/usr/sbin/init": "/lib/systemd/systemd",
        },
    )
    assert image_architecture(image, "ext4") == "arm64"
    assert default_arch(image, "ext4")[0] == "arm64"


def test_bin_sh_answers_when_there_is_no_init(tmp_path: Path) -> None:
    long_name = "busybox-" + "x" * 80  # a slow symlink: its target is in a data block
    image = ext4_of(tmp_path, {f"/bin/{long_name}": X86_64_HEAD}, {"/bin/sh": long_name})
    assert image_architecture(image, "ext4") == "amd64"


def test_no_program_and_other_filesystems_are_unknown(tmp_path: Path) -> None:
    image = ext4_of(tmp_path, {"/etc/hostname": b"x"}, {"/sbin/init": "init", "/bin/sh": "/a"})
    assert image_architecture(image, "ext4") is None  # a loop and a dangling link
    assert image_architecture(image, "squashfs") is None
    arch, source = default_arch(image, "ext4")
    assert arch == host_architecture() and "unknown" in source


def test_each_architecture_has_its_machine_and_console() -> None:
    arm = machine_for("aarch64")
    assert (arm.arch, arm.qemu, arm.console) == ("arm64", "qemu-system-aarch64", "ttyAMA0")
    assert arm.machine_args("tcg") == ["-M", "virt"]
    amd = machine_for("x86_64")
    assert (amd.qemu, amd.console, amd.boot_dir) == ("qemu-system-x86_64", "ttyS0", Path("/boot"))
    assert amd.machine_args("kvm") == []
    with pytest.raises(UsageError, match="riscv64"):
        machine_for("riscv64")


def test_the_arm64_kernel_directory_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RFS_ARM64_BOOT_DIR", str(tmp_path))
    assert machine_for("arm64").boot_dir == tmp_path
    with pytest.raises(EnvironmentProblem) as caught:
        qemu.find_kernel(tmp_path, machine_for("arm64").kernel_hint)
    assert "arm64-kernel.sh" in (caught.value.hint or "")


def test_a_missing_emulator_names_its_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(EnvironmentProblem) as caught:
        machine_for("arm64").qemu_path()
    assert "qemu-system-aarch64 is not installed" in str(caught.value)
    assert "apt-get install qemu-system-arm" in (caught.value.hint or "")


def test_an_arm64_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    image = ext4_of(tmp_path, {"/sbin/init": AARCH64_HEAD}, {})
    monkeypatch.setattr(proc, "tool_path", lambda name: f"/usr/bin/{name}")
    spec = qemu.BootSpec(image=image, arch="arm64")
    argv = qemu.qemu_argv(spec, "tcg", Path("/k"), Path("/i"), machine_for("arm64"))
    assert argv[:5] == ["/usr/bin/qemu-system-aarch64", "-M", "virt", "-accel", "tcg"]
    assert argv[argv.index("-cpu") + 1] == "max"
    append = argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in append and "rootfstype=ext4" in append
    assert argv[argv.index("-initrd") + 1] == "/i"


def test_kvm_is_refused_for_a_foreign_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "host_architecture", lambda: "amd64")
    spec = qemu.BootSpec(image=Path("/x"), accel="kvm")
    with pytest.raises(UsageError, match="KVM cannot run an arm64 guest"):
        qemu.choose_accel(spec, machine_for("arm64"), Path("/k"), None, lambda _: None)
    said: list[str] = []
    spec = qemu.BootSpec(image=Path("/x"))
    assert qemu.choose_accel(spec, machine_for("arm64"), Path("/k"), None, said.append) == "tcg"
    assert said and "emulating the arm64 CPU" in said[0]
