"""Assemble an ext4 image with `mke2fs -d -` fed by the tar filter: no mount, no root, atomic.

mke2fs (e2fsprogs >= 1.47.1) reads the filtered stream on stdin and writes a temporary file next
to the output, which replaces the output only once mke2fs succeeded. Everything that could
vary between runs is pinned so the same inputs give a byte-identical image: UUID and directory
hash seed derived from the build key, all timestamps from SOURCE_DATE_EPOCH, a mke2fs.conf of
our own (the host's may differ or change), and the locale.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from rfs.errors import EnvironmentProblem, Problem, RfsError, ScriptError
from rfs.fs.ext4checksums import CHECKSUM_FEATURES, add_checksums, deferrable
from rfs.fs.image import (
    BaseImageCache,
    Options,
    Source,
    check_size,
    copy_sparse,
    feed,
    scan,
    temp_image,
)
from rfs.fs.tarstream import OverlayEntry, Selection, StreamStats
from rfs.host import proc
from rfs.host.hashing import digest_bytes

log = logging.getLogger("rfs.fs")

MIB = 1 << 20
_MIN_VERSION = (1, 47, 1)
_INSTALL_HINT = (
    "e2fsprogs 1.47.1 or later reads tar streams; on Debian 12 add the bookworm-backports "
    "suite to the apt sources and run: apt-get install -t bookworm-backports e2fsprogs"
)
# Debian's ext4 defaults, pinned, minus orphan_file: e2fsck before 1.47 (Debian 11, Ubuntu
# 22.04 guests) refuses to check a filesystem that has it. 4 KiB blocks at every size (Debian
# uses 1 KiB below 512 MiB), with Debian's denser inode ratios for small images.
EXT4_FEATURES = (
    "has_journal,extent,huge_file,flex_bg,metadata_csum,metadata_csum_seed,64bit,dir_nlink,"
    "extra_isize"
)


def mke2fs_conf(*, checksums: bool = True) -> str:
    """rfs's own mke2fs.conf; `checksums=False` leaves metadata_csum off (rfs.fs.ext4checksums
    adds it after)."""
    features = EXT4_FEATURES
    if not checksums:
        features = ",".join(f for f in features.split(",") if f not in CHECKSUM_FEATURES)
    return "\n".join(
        [
            "[defaults]",
            "    base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr",
            "    default_mntopts = acl,user_xattr",
            "    enable_periodic_fsck = 0",
            "    blocksize = 4096",
            "    inode_size = 256",
            "    inode_ratio = 16384",
            "[fs_types]",
            "    ext4 = {",
            f"        features = {features}",
            "    }",
            "    small = {",
            "        inode_ratio = 4096",
            "    }",
            "    floppy = {",
            "        inode_ratio = 8192",
            "    }",
            "",
        ]
    )


# mke2fs messages that mean the image is too small for the content.
_TOO_SMALL = re.compile(
    r"Could not allocate (block|inode)|No free space in the directory"
    r"|Not enough space to build proposed filesystem"
)


@functools.cache
def mkfs_version() -> str:
    """The versions of mke2fs and debugfs (which writes overlays into cached base images), e.g.
    "mke2fs 1.47.2; debugfs 1.47.2", refusing a mke2fs too old to read tar input."""
    return f"{_mke2fs_version()}; {_debugfs_version()}"


def _version_of(tool: str) -> re.Match[str]:
    """`TOOL -V`'s "TOOL X.Y[.Z]", with the numbers as groups (e2fsprogs tools print it so)."""
    result = proc.run([proc.tool_path(tool), "-V"], what=f"{tool} -V")
    text = (result.stderr + result.stdout).decode("utf-8", "replace")
    match = re.search(rf"{tool} (\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise EnvironmentProblem(f"cannot tell the {tool} version from {text.strip()!r}")
    return match


def _debugfs_version() -> str:
    return _version_of("debugfs").group(0)


def _mke2fs_version() -> str:
    match = _version_of("mke2fs")
    version = tuple(int(part or 0) for part in match.groups())
    if version < _MIN_VERSION:
        raise EnvironmentProblem(
            f"{match.group(0)} is too old: building ext4 from a tar stream needs 1.47.1",
            hint=_INSTALL_HINT,
        )
    return match.group(0)


def assemble_ext4(
    export_tar: Path,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    output: Path,
    *,
    size_mib: int,
    seed: bytes,
    source_date_epoch: int,
    mkfs_args: Sequence[str] = (),
    restore: Mapping[str, bytes] | None = None,
    layers: tuple[Path, ...] = (),
    largest_file: int = 0,
) -> StreamStats:
    """Build `output`, an ext4 image of exactly `size_mib` MiB, from an export (with `layers`
    laid on it: rfs.fs.layered) and overlays. `largest_file`, the size of the content's
    largest file when known, may choose a faster route (rfs.fs.ext4checksums).

    `seed` (32 bytes from the build key) fixes the filesystem UUID and directory hash seed;
    `source_date_epoch` every timestamp mke2fs sets and the mtime of added entries. `mkfs_args`
    go to mke2fs after rfs's own options (an `-E` is merged with rfs's). The output is replaced
    atomically; on any failure, interruption included, nothing is left behind.
    """
    if len(seed) != 32:
        raise RfsError(f"the ext4 seed must be 32 bytes, not {len(seed)}")
    if size_mib < 1:
        raise ScriptError([Problem("filesystem.size_mib", f"must be at least 1, not {size_mib}")])
    mkfs_version()
    if size_mib < 8:
        log.warning("%d MiB is below 8 MiB: mke2fs makes the image without a journal", size_mib)
    fs_uuid = uuid.UUID(bytes=seed[:16], version=4)
    hash_seed = uuid.UUID(bytes=seed[16:], version=4)
    # The temp file is new and sparse, so it reads as zeros: mke2fs need not write zeros into
    # the journal and inode tables (32 MiB of a 1 GiB image), and marks the tables zeroed so
    # the guest kernel does not zero them on first mount either.
    extended = [f"hash_seed={hash_seed}", "root_owner=0:0", "assume_storage_prezeroed=1"]
    argv = [proc.tool_path("mke2fs"), "-q", "-t", "ext4", "-U", str(fs_uuid)]
    argv += _user_args(mkfs_args, extended)
    argv += ["-E", ",".join(extended), "-d", "-"]
    source = Source(export_tar, selection, overlays, restore, layers=layers)
    deferred = deferrable(mkfs_args, largest_file)
    if deferred:
        log.info(
            "mke2fs without metadata checksums, added after (a file of %d MiB)",
            largest_file // MIB,
        )
    try:
        return _make(argv, output, size_mib, source_date_epoch, source, checksums=not deferred)
    except _ChecksumsFailed as exc:
        # Most likely a full image whose directories cannot grow for their checksum tails:
        # made the usual way, mke2fs itself says whether it fits.
        log.info("making the image with checksums from the start: %s", exc)
        return _make(argv, output, size_mib, source_date_epoch, source, checksums=True)


class _ChecksumsFailed(RfsError):
    """The checksums could not be added after mke2fs."""


def _make(
    argv: list[str],
    output: Path,
    size_mib: int,
    source_date_epoch: int,
    source: Source,
    *,
    checksums: bool,
) -> StreamStats:
    """Run mke2fs on `source` into a new `output`, with checksums from the start or after."""
    with (
        temp_image(output, size_mib) as tmp,
        tempfile.TemporaryDirectory(prefix="rfs-mke2fs-") as confdir,
    ):
        conf = Path(confdir, "mke2fs.conf")
        conf.write_text(mke2fs_conf(checksums=checksums))
        env = {
            "MKE2FS_CONFIG": str(conf),
            "E2FSPROGS_FAKE_TIME": str(source_date_epoch),
            "SOURCE_DATE_EPOCH": str(source_date_epoch),
        }
        stats = _run([*argv, str(tmp)], env, source, source_date_epoch, size_mib)
        if not checksums:
            try:
                add_checksums(tmp, source_date_epoch)
            except RfsError as exc:
                raise _ChecksumsFailed(str(exc)) from exc
    return stats


# Bumped whenever the base image or the patch would come out differently for the same inputs.
_BASE_ROUTE = "ext4-base/3"
_INCOMPAT_CSUM_SEED, _RO_COMPAT_METADATA_CSUM = 0x2000, 0x400


def assemble_ext4_patched(
    source: Source, output: Path, options: Options, size_mib: int
) -> tuple[StreamStats, int, bool] | None:
    """Build `output` as the cached base image (made first if missing) with the overlays
    written into it by debugfs (see rfs.fs.ext4patch): in place when `output` is the image rfs
    last wrote from that base image (see rfs.fs.ext4inplace), else into a copy. Returns the
    stats, the number of overlay operations and whether it was patched in place, or None when
    the overlays cannot be patched exactly or debugfs failed: the caller then makes the image
    in full."""
    from rfs.fs.ext4inplace import Slot, patch_in_place
    from rfs.fs.ext4patch import (
        PatchFailed,
        apply_patch,
        derive_layered_patch,
        derive_patch,
        export_index,
        patch_digest,
    )

    cache = options.base_images
    assert cache is not None
    restore = {path: digest_bytes(data) for path, data in (source.restore or {}).items()}
    identity = {
        "route": _BASE_ROUTE,
        "tool": mkfs_version(),
        "size_mib": size_mib,
        "selection": dataclasses.asdict(source.selection),
        "restore": restore,
        "mkfs_args": list(options.mkfs_args),
        "source_date_epoch": options.source_date_epoch,
    }
    key = cache.key(identity)
    try:
        index = export_index(source.export_tar, cache.side_dir(key))
        if source.layers:  # what later commands changed, then the overlays
            patch = derive_layered_patch(
                index,
                source.export_tar,
                source.layers,
                source.selection,
                source.overlays,
                source.restore or {},
                mtime=options.source_date_epoch,
            )
        else:
            patch = derive_patch(
                index,
                source.export_tar,
                source.selection,
                source.overlays,
                source.restore or {},
                mtime=options.source_date_epoch,
            )
    except (OSError, ValueError) as exc:
        raise RfsError(f"cannot read the export tarball {source.export_tar}: {exc}") from exc
    if isinstance(patch, str):
        log.info("making the image in full: %s", patch)
        return None
    base = cache.get(key)
    if base is None:
        with cache.building(key):
            base = cache.get(key)  # made by another build (or package) while this one waited
            if base is None:
                largest = max((e.size for e in index[0] if e.is_regular), default=0)
                _make_base(source, cache, key, identity, size_mib, options, largest)
                base = cache.get(key)
        if base is None:
            raise RfsError("the base image vanished from the cache during the build")
    # The base image's UUID comes from the base key; the image's own comes from its build key,
    # so two images that differ only in overlays do not share a UUID. With metadata_csum but
    # without metadata_csum_seed (a user's -O) the checksums hang on the UUID: keep it then.
    fs_uuid: uuid.UUID | None = uuid.UUID(bytes=options.seed[:16], version=4)
    if "-U" in options.mkfs_args or not _uuid_settable(base):
        fs_uuid = None
    mtime = options.source_date_epoch
    digest = patch_digest(patch, mtime=mtime, fs_uuid=fs_uuid)
    slot = Slot.of(cache.side_dir(key), output)
    try:
        with slot.locked():
            in_place = patch_in_place(
                slot,
                base,
                lambda undo: apply_patch(
                    slot.output, patch, mtime=mtime, fs_uuid=fs_uuid, undo=undo
                ),
                digest,
            )
            if not in_place:
                with slot.copy_route() as undo, temp_image(output, None) as tmp:
                    copy_sparse(base, tmp)
                    apply_patch(tmp, patch, mtime=mtime, fs_uuid=fs_uuid, undo=undo)
                slot.commit(digest)
    except PatchFailed as exc:
        log.info("making the image in full: %s", exc)
        return None
    stats = StreamStats(missing_includes=patch.missing_includes)
    return stats, len(patch.ops), in_place


def _make_base(
    source: Source,
    cache: BaseImageCache,
    key: str,
    identity: Mapping[str, object],
    size_mib: int,
    options: Options,
    largest_file: int,
) -> None:
    """Make the base image of `key`: the export (without layers or overlays) through mke2fs."""
    with cache.put(key) as tmp:
        assemble_ext4(
            source.export_tar,
            source.selection,
            (),
            tmp,
            size_mib=size_mib,
            seed=cache.seed(identity),
            source_date_epoch=options.source_date_epoch,
            mkfs_args=options.mkfs_args,
            restore=source.restore,
            largest_file=largest_file,
        )


def _uuid_settable(image: Path) -> bool:
    """Whether debugfs may change the UUID without rewriting every metadata checksum."""
    with image.open("rb") as f:
        f.seek(1024 + 0x60)
        incompat = int.from_bytes(f.read(4), "little")
        ro_compat = int.from_bytes(f.read(4), "little")
    return bool(incompat & _INCOMPAT_CSUM_SEED or not ro_compat & _RO_COMPAT_METADATA_CSUM)


def _user_args(mkfs_args: Sequence[str], extended: list[str]) -> list[str]:
    """Pass the user's mke2fs options on, folding `-E` into rfs's (mke2fs keeps only the last)."""
    args: list[str] = []
    items = iter(mkfs_args)
    for arg in items:
        if arg == "-E":
            value = next(items, None)
            if value is None:
                raise ScriptError([Problem("filesystem.mkfs_args", "-E needs a value")])
            extended.append(value)
        elif arg.startswith("-E"):
            extended.append(arg[2:])
        elif arg.startswith("-d"):
            raise ScriptError(
                [Problem("filesystem.mkfs_args", "-d is set by rfs (the content comes from it)")]
            )
        else:
            args.append(arg)
    return args


def _run(
    argv: list[str], env: dict[str, str], source: Source, mtime: int, size_mib: int
) -> StreamStats:
    try:
        return feed(argv, source, mtime=mtime, what="mke2fs", env=env)
    except RfsError as exc:
        raise _explain(exc, source, size_mib) from exc


def _explain(exc: RfsError, source: Source, size_mib: int) -> RfsError:
    """Turn a mke2fs failure into the error a person can act on."""
    text = str(exc)
    if "No space left on device" in text:
        return EnvironmentProblem(f"no space left on the disk that holds the image: {text}")
    if "libarchive" in text:
        return EnvironmentProblem(
            f"mke2fs cannot read tar input: {text}", hint="install libarchive13 (libarchive)"
        )
    if _TOO_SMALL.search(text) is None:
        return exc
    stats = scan(source, 0)
    need = max(required_size_mib(stats), size_mib + 1)
    try:
        check_size("ext4", size_mib, need, stats)
    except ScriptError as too_small:
        return too_small
    return exc  # unreachable: need > size_mib


def _journal_blocks(blocks: int) -> int:
    """mke2fs's default journal size (in blocks) for a filesystem of `blocks` blocks."""
    if blocks < 2048:
        return 0
    for limit, size in (
        (32768, 1024),
        (256 << 10, 4096),
        (512 << 10, 8192),
        (4096 << 10, 16384),
        (8192 << 10, 32768),
        (16384 << 10, 65536),
        (32768 << 10, 131072),
    ):
        if blocks < limit:
            return size
    return 262144


def _fits(stats: StreamStats, mib: int) -> bool:
    blocks = mib * (MIB // 4096)
    ratio = 8192 if mib < 3 else 4096 if mib < 512 else 16384  # as MKE2FS_CONF
    inodes = mib * MIB // ratio
    if stats.inodes + 12 > inodes:  # 11 reserved inodes, and lost+found
        return False
    groups = -(-blocks // 32768)
    gdt = -(-groups // 64)
    reserved_gdt = min(1024, -(-groups * 1024 // 64)) - gdt
    backups = 1 + min(groups - 1, 3 + max(0, groups.bit_length() * 2))  # sparse_super, roughly
    overhead = (
        inodes * 256 // 4096  # inode tables
        + _journal_blocks(blocks)
        + groups * 2  # block and inode bitmaps
        + backups * (1 + gdt + max(reserved_gdt, 0))
        + 4  # lost+found
    )
    # Extent blocks, fragmentation and directory growth: keep 3% spare.
    return (stats.data_blocks + overhead) * 103 // 100 <= blocks


def required_size_mib(stats: StreamStats) -> int:
    """Estimate the smallest image (MiB) that holds what a stream with `stats` carries."""
    low, high = 1, 2
    while not _fits(stats, high):
        low, high = high, high * 2
    while low < high:
        mid = (low + high) // 2
        if _fits(stats, mid):
            high = mid
        else:
            low = mid + 1
    return high
