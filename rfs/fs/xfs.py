"""xfs: `mkfs.xfs` on a sparse file, then a loop mount filled by GNU tar from the filtered
stream, then umount. The one route that needs root: xfsprogs 6.1 cannot populate an image from
a directory or a tar archive without losing things (its protofile loses mtimes, the sticky bit,
xattrs and hard links), so rfs does not offer it; as a non-root user rfs refuses xfs and says
which types work without root.

Lossless: GNU tar with `--numeric-owner -p --xattrs --xattrs-include='*'` keeps owners, every
mode bit, devices, hard links and xattrs (capabilities included). Not byte-identical: the
kernel's xfs stamps the log and inodes with the current time and allocation depends on timing;
the UUID is fixed from the build key and file mtimes are clamped.

The image is `size_mib` MiB (at least 300 MiB: mkfs.xfs refuses smaller filesystems), or the
content's size plus headroom; a size the content cannot fit is refused before mkfs runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from rfs.errors import EnvironmentProblem
from rfs.fs.image import (
    MIB,
    Options,
    Result,
    Source,
    feed,
    settle_size,
    temp_image,
)
from rfs.fs.tarstream import StreamStats
from rfs.host import proc

MIN_MIB = 300  # mkfs.xfs (xfsprogs >= 5.19) refuses filesystems under 300 MB
_OVERHEAD_MIB = 80  # log and allocation group headers at small sizes (measured)


@functools.cache
def mkfs_version() -> str:
    """mkfs.xfs's version line, for the assemble key."""
    result = proc.run([proc.tool_path("mkfs.xfs"), "-V"], what="mkfs.xfs -V")
    return (result.stdout + result.stderr).decode("utf-8", "replace").strip().splitlines()[0]


def need_mib(stats: StreamStats) -> int:
    """The smallest image the content fits in: data blocks, 512-byte inodes, and the log and
    allocation group headers mkfs.xfs reserves (about 70 MiB at 300 MiB)."""
    data = stats.data_blocks * 4096 + stats.inodes * 512
    return -(-data * 105 // 100 // MIB) + _OVERHEAD_MIB


def assemble(source: Source, output: Path, options: Options) -> Result:
    """Build an xfs image at `output` from `source` (see the module doc). Needs root."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "xfs images need root: xfsprogs can fill an xfs filesystem losslessly only through "
            "a loop mount",
            hint="run rfs build as root, or choose ext4, btrfs, erofs or squashfs, which need "
            "no root",
        )
    epoch = options.source_date_epoch
    _, size = settle_size(
        "xfs",
        source,
        options,
        need_mib,
        mtime=epoch,
        minimum_mib=MIN_MIB,
        overhead_mib=_OVERHEAD_MIB,
    )
    fs_uuid = uuid.UUID(bytes=options.seed[:16], version=4)
    with temp_image(output, size) as tmp:
        proc.run(
            [
                proc.tool_path("mkfs.xfs"),
                "-q",
                "-f",
                "-m",
                f"uuid={fs_uuid}",
                *options.mkfs_args,
                str(tmp),
            ],
            what="mkfs.xfs",
        )
        with _mounted(tmp) as mnt:
            tar = [
                proc.tool_path("tar"),
                "-x",
                "-C",
                str(mnt),
                "--numeric-owner",
                "-p",
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "--no-overwrite-dir",
            ]
            stats = feed(
                tar, source, mtime=epoch, what="tar -x (into the xfs image)", clamp_mtime=epoch
            )
            # The root directory is the mount point: give it the export's times too.
            os.utime(mnt, (epoch, epoch))
    return Result(stats, size, "mkfs.xfs + loop mount + tar -x (root)")


@contextlib.contextmanager
def _mounted(image: Path) -> Iterator[Path]:
    """Loop-mount `image` on a temporary directory; unmounted (and the loop device, which
    `mount -o loop` marks autoclear, detached) whatever happens in the block."""
    with tempfile.TemporaryDirectory(prefix="rfs-xfs-mnt-") as mnt:
        proc.run(
            [proc.tool_path("mount"), "-t", "xfs", "-o", "loop", str(image), mnt],
            what="mount -o loop (xfs image)",
        )
        try:
            yield Path(mnt)
        finally:
            try:
                proc.run([proc.tool_path("umount"), mnt], what="umount (xfs image)")
            except Exception:
                # Never leave a mount behind: detach it lazily, then report the failure.
                with contextlib.suppress(Exception):
                    proc.run([proc.tool_path("umount"), "-l", mnt], what="umount -l")
                raise


def verify(image: Path) -> None:
    """`xfs_repair -n` (no modify) of the whole image."""
    proc.run([proc.tool_path("xfs_repair"), "-n", str(image)], what="xfs_repair -n (verify)")
