"""btrfs: `mkfs.btrfs --rootdir` from a staged directory under fakeroot (see staging.py).

No root needed: owners, every mode bit, hard links, symlinks, FIFOs and xattrs (capabilities
included) reach mkfs.btrfs through fakeroot. What btrfs-progs 6.2 loses: device numbers
(`--rootdir` writes every character and block device as 0,0), so rfs warns when the tree has
devices. Not byte-identical from run to run: mkfs.btrfs gives the device and chunk tree random
UUIDs and stamps inodes and the superblock with the current time, whatever SOURCE_DATE_EPOCH
says (the filesystem UUID is fixed from the build key; file mtimes are clamped).

The image is `size_mib` MiB (at least 109 MiB: mkfs.btrfs refuses smaller devices), or the
content's size plus headroom; a size the content cannot fit is refused before mkfs runs, or
after it when mkfs.btrfs needed more than the estimate (it then extends the file: a computed
size grows with it, a given `size_mib` fails with the size it took).
"""

from __future__ import annotations

import functools
import re
import uuid
from pathlib import Path

from rfs.errors import Problem, RfsError, ScriptError
from rfs.fs import staging
from rfs.fs.image import (
    MIB,
    Options,
    Result,
    Source,
    check_size,
    settle_size,
    stream_pipe,
    temp_image,
)
from rfs.fs.tarstream import StreamStats
from rfs.host import proc

MIN_MIB = 109  # mkfs.btrfs refuses devices under 114294784 bytes
_OVERHEAD_MIB = 80  # mkfs.btrfs's own chunks (measured)
_TOO_SMALL = re.compile(r"No space left|ENOSPC|too small|not enough free space", re.I)


@functools.cache
def mkfs_version() -> str:
    """mkfs.btrfs's version line, for the assemble key (fakeroot must be there too)."""
    proc.tool_path("fakeroot")
    result = proc.run([proc.tool_path("mkfs.btrfs"), "--version"], what="mkfs.btrfs --version")
    return (result.stdout + result.stderr).decode("utf-8", "replace").strip().splitlines()[0]


def need_mib(stats: StreamStats) -> int:
    """The smallest image the content fits in: data in 4 KiB sectors, metadata twice (DUP), and
    the fixed chunks mkfs.btrfs allocates (measured: 2 x 32 MiB metadata + 8 MiB system)."""
    data = stats.data_blocks * 4096
    metadata = 2 * (stats.inodes * 600 + stats.entries * 200 + stats.content_bytes // 50)
    return -(-(data + metadata) // MIB) + _OVERHEAD_MIB


def assemble(source: Source, output: Path, options: Options) -> Result:
    """Build a btrfs image at `output` from `source` (see the module doc)."""
    epoch = options.source_date_epoch
    stats, size = settle_size(
        "btrfs",
        source,
        options,
        need_mib,
        mtime=epoch,
        minimum_mib=MIN_MIB,
        overhead_mib=_OVERHEAD_MIB,
    )
    need = need_mib(stats)
    fs_uuid = uuid.UUID(bytes=options.seed[:16], version=4)
    mkfs = proc.tool_path("mkfs.btrfs")
    warnings: list[str] = []
    with staging.staging_dir(output, source.export_tar.stat().st_size) as root:
        with stream_pipe(source, mtime=epoch, clamp_mtime=epoch) as piped:
            staged = staging.extract(piped.reader, root, clamp_mtime=epoch)
        if staged.inventory.devices:
            warnings.append(_devices_warning(staged.inventory.devices))
        with temp_image(output, size) as tmp, staging.fakeroot_for(staged) as fake:
            argv = [
                mkfs,
                "--quiet",
                "--force",
                "--uuid",
                str(fs_uuid),
                "--rootdir",
                str(root),
                *options.mkfs_args,
                str(tmp),
            ]
            try:
                proc.run(fake.wrap(argv), what="mkfs.btrfs")
            except RfsError as exc:
                if _TOO_SMALL.search(str(exc)) and options.size_mib is not None:
                    raise ScriptError(
                        [
                            Problem(
                                "filesystem.size_mib",
                                f"{size} MiB is too small for this btrfs image: {exc}",
                            )
                        ],
                        hint=f"set size_mib to {need + need // 4} or more",
                    ) from exc
                raise
            # mkfs.btrfs --rootdir extends a file that is too small instead of failing.
            grown = -(-tmp.stat().st_size // MIB)
            if grown > size:
                if options.size_mib is not None:
                    check_size("btrfs", size, grown, piped.stats)
                size = grown
    return Result(
        piped.stats, size, "tar stream → staging dir → fakeroot mkfs.btrfs --rootdir", warnings
    )


def _devices_warning(devices: list[str]) -> str:
    shown = ", ".join(devices[:3]) + (f" and {len(devices) - 3} more" if len(devices) > 3 else "")
    return (
        f"btrfs: mkfs.btrfs --rootdir writes device nodes as 0,0: {len(devices)} device(s) "
        f"lose their numbers ({shown}); a devtmpfs on /dev hides this at boot"
    )


def verify(image: Path) -> None:
    """`btrfs check` (read-only) of the whole image."""
    proc.run(
        [proc.tool_path("btrfs"), "check", "--readonly", str(image)], what="btrfs check (verify)"
    )
