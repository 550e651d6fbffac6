"""`rfs boot IMAGE`: boot an image under QEMU with the serial console attached, or, with
`--expect TEXT`, as a check that exits 0 once TEXT appears on the console."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rfs.errors import EXIT_OK


def register(sub: Any) -> None:
    """Add the `boot` parser."""
    p = sub.add_parser("boot", help="boot an image under QEMU (serial console)")
    p.add_argument("image", type=Path, help="the image file (ext4, squashfs, erofs, btrfs, xfs)")
    p.add_argument(
        "--kernel",
        type=Path,
        help="kernel to boot (default: the newest vmlinuz-* of /boot, or for arm64 of "
        "$RFS_ARM64_BOOT_DIR, default /var/cache/rfs/boot/arm64)",
    )
    p.add_argument(
        "--initrd", type=Path, help="initrd (default: the one next to the default kernel)"
    )
    p.add_argument(
        "--expect",
        metavar="TEXT",
        help="exit 0 once TEXT appears on the console, non-zero on timeout",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for --expect (default 120)",
    )
    p.add_argument(
        "--memory", type=int, default=512, metavar="MIB", help="guest memory in MiB (default 512)"
    )
    p.add_argument("--cpus", type=int, default=1, help="guest CPUs (default 1)")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    p.add_argument(
        "--arch",
        type=_arch,
        metavar="ARCH",
        help="the image's architecture: amd64 or arm64 (also x86_64, aarch64, linux/arm64); "
        "default: the ELF machine of the image's /sbin/init (ext4), else the host's",
    )
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="auto (default): KVM if a quick probe boots, else TCG emulation",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help="let the guest write to the image (default: a throwaway snapshot)",
    )
    p.set_defaults(func=run)


def _arch(text: str) -> str:
    """An --arch value as the machine table names it ("linux/arm64/v8" -> "arm64")."""
    from rfs.vm.machines import ALIASES, MACHINES

    parts = text.lower().split("/")
    arch = parts[1] if len(parts) in (2, 3) and parts[0] == "linux" else text.lower()
    arch = ALIASES.get(arch, arch)
    if arch not in MACHINES:
        raise argparse.ArgumentTypeError(f"{text!r} is not amd64 or arm64")
    return arch


def run(args: argparse.Namespace) -> int:
    """Boot the image; with --expect, wait for the text and stop the VM."""
    from rfs.vm.qemu import BootSpec, boot

    spec = BootSpec(
        image=args.image,
        kernel=args.kernel,
        initrd=args.initrd,
        memory_mib=args.memory,
        cpus=args.cpus,
        append=args.append,
        accel=args.accel,
        arch=args.arch,
        write=args.write,
    )

    def echo(data: bytes) -> None:
        if not args.quiet:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    seconds = boot(spec, expect=args.expect, timeout_s=args.timeout, echo=echo)
    if args.expect is not None:
        print(f"\nrfs: {args.expect!r} appeared after {seconds:.1f} s", file=sys.stderr)
    return EXIT_OK
