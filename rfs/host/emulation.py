"""Whether this host can run another architecture's programs: a binfmt_misc handler for its
ELF files (Debian's qemu-user-static registers one per architecture, with the F flag, so it
works inside containers too; `scripts/setup-host.sh` installs and registers it).

Commands of a `container.platform` build whose architecture is not the host's run under such
a handler; without one the first command would fail with an unhelpful "exec format error", so
`rfs check` and the build say it up front (`cannot_run`).
"""

from __future__ import annotations

import platform as _platform
from pathlib import Path

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
# ELF e_machine of each architecture, as the bytes at offset 18 of the header (little endian
# but for s390x), in the hex a binfmt_misc entry's "magic" line shows.
_E_MACHINE = {
    "amd64": "3e00",
    "386": "0300",
    "arm64": "b700",
    "arm": "2800",
    "riscv64": "f300",
    "ppc64le": "1500",
    "s390x": "0016",
    "mips64le": "0800",
}
_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}


def elf_architecture(header: bytes) -> str | None:
    """The architecture ("arm64") of an ELF file whose first 20 bytes are `header`, None when
    it is no ELF file or of a machine rfs does not name."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    e_machine = header[18:20].hex()
    return next((arch for arch, known in _E_MACHINE.items() if known == e_machine), None)


def host_architecture() -> str:
    """This host's architecture as engines name it ("amd64", "arm64")."""
    machine = _platform.machine()
    return _HOST_ARCH.get(machine, machine)


def _handles(entry: str, e_machine: str) -> bool:
    lines = entry.splitlines()
    if not lines or lines[0].strip() != "enabled":
        return False
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    magic, offset = fields.get("magic", ""), fields.get("offset", "0")
    # The ELF signature, then e_machine at offset 18 (bytes 36..40 of the hex).
    return offset.strip() == "0" and magic.startswith("7f454c46") and magic[36:40] == e_machine


def cannot_run(arch: str, binfmt: Path | None = None) -> str | None:
    """Why this host cannot run programs of architecture `arch` ("arm64"), or None if it can
    (its own architecture, or a binfmt_misc handler registered for it in `binfmt`, by default
    `BINFMT_MISC`)."""
    binfmt = BINFMT_MISC if binfmt is None else binfmt
    if arch == host_architecture():
        return None
    e_machine = _E_MACHINE.get(arch)
    if e_machine is None:
        return f"rfs knows no ELF machine for the architecture {arch}"
    if not (binfmt / "register").exists():
        return f"binfmt_misc is not mounted at {binfmt}, so no {arch} emulator is registered"
    for entry in sorted(binfmt.iterdir()):
        if entry.name in ("register", "status"):
            continue
        try:
            text = entry.read_text(errors="replace")
        except OSError:
            continue
        if _handles(text, e_machine):
            return None
    return f"no binfmt_misc handler runs {arch} programs on this {host_architecture()} host"
