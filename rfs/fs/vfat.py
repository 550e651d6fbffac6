"""vfat: `mkfs.vfat` on a sparse file, then mtools (`mcopy`) copies a staged tree in. No mount,
no root. For boot partitions and data images, not root filesystems: FAT has no owners, no
permission bits (beyond read-only), no symlinks, devices, FIFOs or hard links, no xattrs,
case-insensitive names and timestamps from 1980 on in 2-second steps. rfs warns about each kind
of content the tree has that FAT cannot hold: symlinks, devices and FIFOs are left out, hard
links become copies, owners, modes and xattrs are dropped.

Reproducible: `mkfs.vfat --invariant` with the volume ID from the build key, mtimes clamped to
SOURCE_DATE_EPOCH (and raised to 1980, FAT's first day), files copied in sorted order.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from rfs.fs import staging
from rfs.fs.image import (
    MIB,
    Options,
    Result,
    Source,
    settle_size,
    stream_pipe,
    temp_image,
)
from rfs.fs.tarstream import StreamStats
from rfs.host import proc

FAT_EPOCH = 315532800  # 1980-01-01T00:00:00Z: FAT cannot store an earlier time
_BAD_CHARS = set('"*:<>?\\|')


@functools.cache
def mkfs_version() -> str:
    """mkfs.vfat's and mcopy's versions, for the assemble key."""
    mkfs = proc.run([proc.tool_path("mkfs.vfat"), "--help"], what="mkfs.vfat --help")
    mcopy = proc.run([proc.tool_path("mcopy"), "--version"], what="mcopy --version")
    first = (mkfs.stdout + mkfs.stderr).decode("utf-8", "replace").strip().splitlines()[0]
    second = mcopy.stdout.decode("utf-8", "replace").strip().splitlines()[0]
    return f"{first}; {second}"


def need_mib(stats: StreamStats) -> int:
    """The smallest image the content fits in: 4 KiB clusters, 32-byte directory entries (long
    names take several), two FATs and the reserved sectors."""
    data = stats.data_blocks * 4096 + stats.entries * 128
    return -(-data * 103 // 100 // MIB) + 2


def assemble(source: Source, output: Path, options: Options) -> Result:
    """Build a vfat image at `output` from `source` (see the module doc)."""
    epoch = max(options.source_date_epoch, FAT_EPOCH)
    _, size = settle_size("vfat", source, options, need_mib, mtime=epoch, overhead_mib=2)
    volume_id = options.seed[:4].hex()
    env = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch), "TZ": "UTC"}
    with staging.staging_dir(output, source.export_tar.stat().st_size) as root:
        with stream_pipe(source, mtime=epoch, clamp_mtime=epoch) as piped:
            staged = staging.extract(piped.reader, root, clamp_mtime=epoch, plain=True)
        _raise_times(root, epoch)
        _rename_unstorable(root)
        warnings = lost(staged.inventory)
        with temp_image(output, size) as tmp:
            proc.run(
                [
                    proc.tool_path("mkfs.vfat"),
                    "--invariant",
                    "-i",
                    volume_id,
                    *options.mkfs_args,
                    str(tmp),
                ],
                env=env,
                what="mkfs.vfat",
            )
            top = sorted(os.listdir(root))
            if top:
                proc.run(
                    [
                        proc.tool_path("mcopy"),
                        "-i",
                        str(tmp),
                        "-s",
                        "-m",
                        "-Q",
                        "-D",
                        "o",
                        *[str(root / name) for name in top],
                        "::/",
                    ],
                    env=env,
                    what="mcopy",
                )
    return Result(piped.stats, size, "tar stream → staging dir → mkfs.vfat + mcopy", warnings)


def _raise_times(root: Path, epoch: int) -> None:
    """FAT starts in 1980: a clamped time of 0 would wrap around in mtools."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime < FAT_EPOCH:
                os.utime(path, (epoch, epoch), follow_symlinks=False)


def _rename_unstorable(root: Path) -> None:
    """Replace the characters FAT cannot store with "_" (mtools refuses such names, and would
    fail the whole copy): /var/lib/dpkg/info/libc6:amd64.list becomes libc6_amd64.list."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*dirnames, *filenames]:
            if _BAD_CHARS.isdisjoint(name):
                continue
            fixed = "".join("_" if c in _BAD_CHARS else c for c in name)
            target, n = fixed, 1
            while os.path.lexists(os.path.join(dirpath, target)):
                target, n = f"{fixed}~{n}", n + 1
            os.rename(os.path.join(dirpath, name), os.path.join(dirpath, target))


def lost(inv: staging.Inventory) -> list[str]:
    """One warning per kind of content FAT cannot hold, with a few example paths."""
    warnings = []
    kinds = [
        (inv.symlinks, "symlink(s) left out"),
        (inv.devices, "device node(s) left out"),
        (inv.fifos, "FIFO(s) left out"),
        (inv.hardlinks, "hard link(s) stored as separate copies"),
        (inv.owned, "path(s) not owned by root:root lose their owner"),
        (inv.special, "setuid/setgid/sticky bit(s) dropped"),
        (inv.xattrs, "path(s) lose their xattrs"),
    ]
    seen: dict[str, str] = {}
    clashes: list[str] = []
    bad: list[str] = []
    foreign: list[str] = []
    for name in inv.names:
        if not name.isascii():
            foreign.append(name)
        folded = name.casefold()
        if folded in seen and seen[folded] != name:
            clashes.append(name)
        seen[folded] = name
        if _BAD_CHARS & set(name.rsplit("/", 1)[-1]):
            bad.append(name)
    kinds += [
        (clashes, "name(s) that differ only in case from another (one is lost)"),
        (bad, 'name(s) with characters FAT cannot store (stored with "_" instead)'),
        (foreign, "name(s) that are not ASCII (mtools may change their case or bytes)"),
    ]
    for paths, what in kinds:
        if paths:
            shown = ", ".join(paths[:3]) + (" …" if len(paths) > 3 else "")
            warnings.append(f"vfat: {len(paths)} {what}: {shown}")
    return warnings


def verify(image: Path) -> None:
    """`fsck.vfat -n` (no changes) of the whole image."""
    proc.run([proc.tool_path("fsck.vfat"), "-n", str(image)], what="fsck.vfat -n (verify)")
