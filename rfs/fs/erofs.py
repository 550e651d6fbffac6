"""erofs: `mkfs.erofs` (erofs-utils) from a staged directory under fakeroot (see staging.py).

erofs-utils 1.5 (Debian 12) cannot read a tar archive (`--tar` came in 1.7), so the filtered
stream is staged and the owners, modes, device numbers and xattrs reach mkfs.erofs through
fakeroot: no root needed, nothing lost (erofs holds everything an export carries).

Reproducible: the UUID comes from the build key, every mtime is clamped to SOURCE_DATE_EPOCH
(which mkfs.erofs also takes as the build time), and mkfs.erofs writes directories in sorted
order. Uncompressed unless `mkfs_args` asks (e.g. `-zlz4hc`). The image is as large as its
content; with `size_mib`, it is padded (sparsely) to that size and refused if it does not fit.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

from rfs.fs import staging
from rfs.fs.image import Options, Result, Source, pad_to, stream_pipe, temp_image
from rfs.host import proc


@functools.cache
def mkfs_version() -> str:
    """mkfs.erofs's version line, for the assemble key (fakeroot must be there too)."""
    proc.tool_path("fakeroot")
    result = proc.run([proc.tool_path("mkfs.erofs"), "--help"], what="mkfs.erofs --help")
    text = (result.stdout + result.stderr).decode("utf-8", "replace")
    first = next((ln for ln in text.splitlines() if ln.startswith("mkfs.erofs")), "")
    return first.strip() or "mkfs.erofs"


def assemble(source: Source, output: Path, options: Options) -> Result:
    """Build an erofs image at `output` from `source` (see the module doc)."""
    epoch = options.source_date_epoch
    fs_uuid = uuid.UUID(bytes=options.seed[:16], version=4)
    mkfs = proc.tool_path("mkfs.erofs")
    with staging.staging_dir(output, source.export_tar.stat().st_size) as root:
        with stream_pipe(source, mtime=epoch, clamp_mtime=epoch) as piped:
            staged = staging.extract(piped.reader, root, clamp_mtime=epoch)
        with temp_image(output, None) as tmp, staging.fakeroot_for(staged) as fake:
            argv = [mkfs, "--quiet", f"-U{fs_uuid}", *options.mkfs_args, str(tmp), str(root)]
            proc.run(fake.wrap(argv), env={"SOURCE_DATE_EPOCH": str(epoch)}, what="mkfs.erofs")
            size = pad_to(tmp, options.size_mib, "erofs", piped.stats)
    return Result(piped.stats, size, "tar stream → staging dir → fakeroot mkfs.erofs")


def verify(image: Path) -> None:
    """Check the whole image with fsck.erofs (it reads every inode and directory)."""
    proc.run([proc.tool_path("fsck.erofs"), str(image)], what="fsck.erofs (verify)")
