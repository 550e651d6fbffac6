"""One entry point for every filesystem type: `assemble`, `tool_version` and `verify`.

| type     | route                                                    | root? | bit-identical |
|----------|----------------------------------------------------------|-------|---------------|
| ext4     | tar stream → `mke2fs -d -` (no overlays), then debugfs   | no    | yes           |
| squashfs | tar stream → `tar2sqfs`                                  | no    | yes           |
| erofs    | tar stream → staging dir → `mkfs.erofs` under fakeroot   | no    | yes           |
| btrfs    | tar stream → staging dir → `mkfs.btrfs --rootdir` (fakeroot) | no | no         |
| vfat     | tar stream → staging dir → `mkfs.vfat` + `mcopy`         | no    | yes           |
| xfs      | `mkfs.xfs` + loop mount + `tar -x`                       | yes   | no            |

What each cannot hold is in its module's doc; each warns when the tree has such content.
Drivers are imported on demand, so a build only needs the tools of the type it makes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from rfs.errors import RfsError
from rfs.fs.image import (
    Options,
    Result,
    Source,
    Warn,
    check_block_size,
    check_size,
    scan,
    with_headroom,
)
from rfs.fs.tarstream import OverlayEntry, Selection
from rfs.script.model import FsType

_MODULES = {
    FsType.EXT4: "ext4",
    FsType.SQUASHFS: "squashfs",
    FsType.EROFS: "erofs",
    FsType.BTRFS: "btrfs",
    FsType.VFAT: "vfat",
    FsType.XFS: "xfs",
}
BIT_IDENTICAL = frozenset({FsType.EXT4, FsType.SQUASHFS, FsType.EROFS, FsType.VFAT})
NEEDS_ROOT = frozenset({FsType.XFS})


def _driver(fs_type: FsType) -> ModuleType:
    return importlib.import_module(f"rfs.fs.{_MODULES[fs_type]}")


def tool_version(fs_type: FsType, *, fresh: bool = False) -> str:
    """The version of the tool(s) that make `fs_type` images: part of the assemble key.

    Drivers remember it for the process; `fresh` asks the tools again (their files changed:
    a long `rfs build --watch` outlives a tool upgrade).
    """
    ask = _driver(fs_type).mkfs_version
    if fresh:
        ask.cache_clear()
    version: str = ask()
    return version


def assemble(
    fs_type: FsType,
    export_tar: Path,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    output: Path,
    options: Options,
    *,
    restore: Mapping[str, bytes] | None = None,
    warn: Warn | None = None,
    layers: tuple[Path, ...] = (),
) -> Result:
    """Make `output`, a `fs_type` image of the export with the overlays, atomically.

    `layers` (layer diffs, rfs.fs.layered) are laid on the export first.

    Warnings (content the type cannot hold, includes that matched nothing, dd_args that have no
    meaning without dd) go to `warn` as well as into the result.
    """
    source = Source(
        Path(export_tar), selection, overlays, restore, all_root=options.all_root, layers=layers
    )
    if len(options.seed) != 32:
        raise RfsError(f"the image seed must be 32 bytes, not {len(options.seed)}")
    early: list[str] = []
    if options.dd_args:
        early.append(
            f"filesystem.dd_args {list(options.dd_args)} ignored: rfs writes a sparse image "
            "file without dd"
        )
    if fs_type is FsType.EXT4:
        result = _ext4(source, output, options)
    else:
        result = _driver(fs_type).assemble(source, output, options)
    for path in result.stats.missing_includes:
        early.append(f"export include {path} matched nothing in the container filesystem")
    result.warnings[:0] = early
    if warn is not None:
        for text in result.warnings:
            warn(text)
    return result


def _ext4(source: Source, output: Path, options: Options) -> Result:
    from rfs.fs.ext4 import (
        assemble_ext4,
        assemble_ext4_patched,
        mkfs_version,
        required_size_mib,
    )

    mkfs_version()  # refuse an old mke2fs before scanning
    if options.size_mib is not None:
        # No scan: mke2fs says when the content does not fit, and that error scans to explain.
        size = options.size_mib
    else:
        stats = scan(source, options.source_date_epoch)
        need = required_size_mib(stats)
        size = with_headroom(need)
        check_size("ext4", size, need, stats)
    check_block_size(options, size)
    if options.base_images is not None:
        patched = assemble_ext4_patched(source, output, options, size)
        if patched is not None:
            stats, operations, in_place = patched
            how = "debugfs in place" if in_place else "debugfs"
            return Result(stats, size, f"cached base image + {how} ({operations} change(s))")
    stats = assemble_ext4(
        source.export_tar,
        source.selection,
        source.overlays,
        output,
        size_mib=size,
        seed=options.seed,
        source_date_epoch=options.source_date_epoch,
        mkfs_args=options.mkfs_args,
        restore=source.restore,
        layers=source.layers,
    )
    return Result(stats, size, "tar stream → mke2fs -d -")


def verify(fs_type: FsType, image: Path) -> None:
    """Run the type's checker on `image` (read-only); raise RfsError if it finds a problem."""
    if fs_type is FsType.EXT4:
        from rfs.host import proc

        proc.run([proc.tool_path("e2fsck"), "-fn", str(image)], what="e2fsck -fn (verify)")
        return
    _driver(fs_type).verify(image)
