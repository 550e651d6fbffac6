"""Metadata checksums added after mke2fs has written the files, for images with large files.

With metadata_csum, libext2fs rewrites a file's extent block and recomputes its crc32c for
every 4 KiB block it writes once the file has more extents than fit in its inode (4 extents of
at most 128 MiB, fewer where block groups split them): on this machine `mke2fs -d` of one 1.5
GiB file took 11.3 s with checksums and 3.5 s without (perf put most of its 8 s of user time in
crc32c). So when the content has a file over LARGE_FILE_BYTES, mke2fs makes the image without
them; tune2fs then turns metadata_csum and metadata_csum_seed on (separately: set together, the
stored seed is 0, not the one derived from the UUID) and `e2fsck -fy` gives every directory
block its checksum tail, rebuilding (and indexing) the directories whose blocks had no room
left. The result is a normal metadata_csum image, the same for the same inputs; only the
directories e2fsck rebuilt differ from what mke2fs would have made, which is why images without
large files keep the usual route.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rfs.host import proc

# Options of a user's that choose features themselves: then mke2fs makes what they say, with
# checksums from the start (an ext2 or a `-O ^metadata_csum` image must not gain them).
_FEATURE_OPTIONS = ("-O", "-t", "-T", "-r")
CHECKSUM_FEATURES = ("metadata_csum", "metadata_csum_seed")
# A file below this rarely needs more extents than its inode holds (4, of up to 128 MiB each).
LARGE_FILE_BYTES = 256 << 20


def deferrable(mkfs_args: Sequence[str], largest_file: int) -> bool:
    """Whether to add the checksums after mke2fs: the content has a file over
    LARGE_FILE_BYTES (`largest_file` bytes) and the user chose no features."""
    if largest_file <= LARGE_FILE_BYTES:
        return False
    return not any(arg.startswith(_FEATURE_OPTIONS) for arg in mkfs_args)


def add_checksums(image: Path, source_date_epoch: int) -> None:
    """Turn metadata checksums on in `image`, made by mke2fs without them, as mke2fs would
    have made them: the same checksum seed, every directory block with its tail. Raises
    RfsError (naming the tool) when a tool fails, e.g. when directories cannot grow to make
    room for their tails in a full image."""
    # A fake time of 0 reads as none to e2fsprogs, which then writes the clock's time into
    # the backup superblocks; SOURCE_DATE_EPOCH (honoured since 1.47.1) keeps a 0 as mke2fs.
    now = str(source_date_epoch)
    clock: Mapping[str, str] = {
        "E2FSPROGS_FAKE_TIME": now,
        "E2FSCK_TIME": now,
        "SOURCE_DATE_EPOCH": now,
    }
    for feature in CHECKSUM_FEATURES:
        proc.run(
            [proc.tool_path("tune2fs"), "-O", feature, str(image)],
            env=clock,
            what=f"tune2fs -O {feature}",
        )
    # Exit 1 means "file system was modified": the directory tails were added, as asked.
    proc.run(
        [proc.tool_path("e2fsck"), "-fy", str(image)],
        env=clock,
        what="e2fsck -fy (directory checksums)",
        accept=(0, 1),
    )
