"""Filter a `docker export` tarball into the tar stream `mke2fs -d -` turns into an image.

A streaming, byte-level filter, not an extraction: kept entries pass through as their original
bytes (headers, PAX records, data), so numeric owners, large ids, every mode bit and
`SCHILY.xattr.*` records survive. Runs of untouched entries are copied in one go (sendfile when
both ends are real files), so the cost is parsing headers, not moving data. The fixes below are
the only changes (see /work/shared/ASSEMBLY.md for the measurements behind them):

- hard-link headers whose mode carries file-type bits get them cleared (mke2fs would otherwise
  create empty regular files);
- `/.dockerenv` and everything under `/.rfs` are dropped;
- an empty regular `/dev/console` becomes the character device 5,1 (0600 root:root);
- an empty regular file named in `restore` gets that content; Docker empties /etc/hostname,
  /etc/hosts and /etc/resolv.conf in exports and shows them as 0755 (its bind-mount targets),
  so those three, when empty, get mode 0644 whether restored or not;
- with `clamp_mtime`, every mtime later than it is lowered to it (tools that keep the archive's
  timestamps, unlike mke2fs, need it for a reproducible image);
- PAX path records that are not UTF-8 are marked `hdrcharset=BINARY` (mke2fs fails otherwise);
- a hard link whose target was left out is written as the file itself (the export is read
  through a mmap, so the target's data is at hand).
Then come created paths and overlays, last so they always win, each preceded by any missing
parent directory (0755 root). Every path has one entry: a directory laid over a directory (an
overlay directory at `/` meets /etc, /usr...) changes only its owner, mode and time, so the
first entry for it carries the last directory's and the later ones are not written. mke2fs
would take a second entry as a metadata update, but tar2sqfs refuses it ("etc: File exists").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from rfs.fs import tarformat as tf
from rfs.fs.layered import Segments, apply_layers, shifted
from rfs.fs.overlay import OverlayEntry, overlay_entries_from_dir
from rfs.fs.plan import CONSOLE, Generated, Plan, make_plan
from rfs.fs.selection import Selection, ancestors, decode, encode, normalise
from rfs.fs.tarwriter import Writer as _Writer
from rfs.fs.tarwriter import mapped as _mapped

__all__ = [
    "OverlayEntry",
    "Selection",
    "StreamStats",
    "overlay_entries_from_dir",
    "write_image_stream",
]

ENGINE_ETC_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_FS_BLOCK = 4096  # ext4 block size rfs formats with, for the size estimate


@dataclass
class StreamStats:
    """What went into the stream; enough to explain an image and estimate its size."""

    entries: int = 0  # entries written (export and generated)
    content_bytes: int = 0  # bytes of file data written
    tar_bytes: int = 0  # bytes of tar stream written
    from_export: int = 0  # export entries kept
    dropped: int = 0  # export entries left out (selection, excludes, fixed drops, overlaid)
    generated: int = 0  # created paths, overlays and missing parent directories
    hardlinks_fixed: int = 0  # link headers whose file-type mode bits were cleared
    links_materialised: int = 0  # links to a left-out file, written as that file
    restored: list[str] = field(default_factory=list)  # paths whose content `restore` supplied
    missing_includes: list[str] = field(default_factory=list)  # includes not in the export
    inodes: int = 0  # inodes the image needs (entries minus hard links)
    data_blocks: int = 0  # 4 KiB blocks for file data, directories and long symlinks


def write_image_stream(
    export_tar: BinaryIO,
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    out: BinaryIO,
    *,
    mtime: int,
    restore: Mapping[str, bytes] | None = None,
    clamp_mtime: int | None = None,
    all_root: bool = False,
    layers: Sequence[BinaryIO] = (),
) -> StreamStats:
    """Write the filtered export, created paths and overlays to `out` as one tar stream.

    `layers` (normalised layer tarballs, rfs.engine.layerdiff) are laid on the export first
    (rfs.fs.layered): the stream is that of the container exported after the last of them.
    Raises rfs.fs.layered.Unlayerable when they cannot be laid on exactly.

    `export_tar` is read whole, whatever its position: mapped when it is a real file, else read
    (or, for a BytesIO, used in place). Created and overlay entries get `mtime`; with
    `clamp_mtime`, export entries newer than it get it too. Raises ScriptError for a bad
    selection or overlay and TarError for a damaged export. `all_root`: every entry is owned
    by root (uid and gid 0), as `mksquashfs -all-root` makes them.
    """
    with _mapped(export_tar) as (buf, src_fd), contextlib.ExitStack() as stack:
        entries = tf.index_archive(buf) if src_fd is None else tf.index_file(src_fd, buf)
        layered = None
        if layers:
            parts = [(buf, src_fd), *(stack.enter_context(_mapped(layer)) for layer in layers)]
            layered = Segments(parts)
            entries = apply_layers(
                entries,
                [
                    shifted(tf.index_archive(part), base)
                    for (part, _), base in zip(parts[1:], layered.bases[1:], strict=True)
                ],
            )
        plan = make_plan(entries, selection, overlays, restore or {})
        writer = _Writer(buf, src_fd, out, layered)
        try:
            stats = _Emitter(plan, writer, mtime, clamp_mtime, all_root=all_root).run()
        finally:
            writer.close()
    out.flush()
    return stats


class _Emitter:
    """Walks the plan and writes every entry, fixing what must be fixed."""

    def __init__(
        self,
        plan: Plan,
        writer: _Writer,
        mtime: int,
        clamp: int | None = None,
        *,
        all_root: bool = False,
    ) -> None:
        self.plan = plan
        self.all_root = all_root
        # PAX owner records would override the ustar owner fields: dropped with all_root.
        self.no_owner: tuple[bytes, ...] = _OWNER_RECORDS if all_root else ()
        if all_root:
            for generated in plan.generated:
                generated.uid = generated.gid = 0
        self.w = writer
        self.mtime = mtime
        self.clamp = clamp
        # A PAX mtime record would override the clamped ustar field: drop it when clamping.
        self.no_mtime: tuple[bytes, ...] = (b"mtime",) if clamp is not None else ()
        self.stats = StreamStats(missing_includes=list(plan.missing_includes))
        self.present: dict[str, bool] = {"/": True, "": True}  # path -> is a directory
        self.link_names: dict[str, bytes] = {}  # path of an emitted inode -> name to link to
        self.dirent_bytes = 0
        # The last directory the created paths and overlays put at each path: whichever entry
        # writes the path first carries its owner, mode and time (see the module doc).
        self.dir_meta: dict[str, Generated] = {
            g.path: g for g in plan.generated if g.typeflag == tf.DIRECTORY and not g.dropped
        }

    def run(self) -> StreamStats:
        plan = self.plan
        for entry, path, keep in zip(plan.entries, plan.paths, plan.keep, strict=True):
            if not keep:
                self.stats.dropped += 1
            elif not path:
                self.w.copy(entry.start, entry.end)  # PAX global header: stays in place
            else:
                self._export_entry(entry, path)
        for generated in plan.generated:
            if not generated.dropped:
                self._generated(generated)
        self.w.write(tf.ZERO_BLOCK * 2)
        self.w.flush()
        self.stats.tar_bytes = self.w.written
        self.stats.data_blocks += -(-self.dirent_bytes // _FS_BLOCK)
        return self.stats

    def _account(self, path: str, typeflag: int, size: int, target_len: int = 0) -> None:
        st = self.stats
        st.entries += 1
        self.dirent_bytes += 8 + ((len(path) - path.rfind("/") + 2) & ~3)  # name, 4-aligned
        if typeflag == tf.HARDLINK:
            return
        if typeflag == tf.DIRECTORY and self.present.get(path):
            return  # a second entry for a directory only updates its metadata
        st.inodes += 1
        if typeflag in tf.REGULAR_TYPES:
            st.content_bytes += size
            st.data_blocks += -(-size // _FS_BLOCK)
        elif typeflag == tf.DIRECTORY or (typeflag == tf.SYMLINK and target_len >= 60):
            st.data_blocks += 1

    def _parents(self, path: str) -> None:
        if path[: path.rfind("/")] in self.present:  # the usual case: parent already written
            return
        for above in ancestors(path):
            if above not in self.present:
                meta = self.dir_meta.get(above)
                if meta is None:
                    self._emit_new(above, tf.DIRECTORY, 0o755)
                else:  # an overlay directory comes later: this entry is the one written
                    self._emit_new(above, tf.DIRECTORY, meta.mode, meta.uid, meta.gid)

    def _clamped(self, block: bytearray) -> bool:
        """Lower the header's mtime to the clamp; True if it changed."""
        if self.clamp is None or tf.parse_number(bytes(block[136:148])) <= self.clamp:
            return False
        block[136:148] = b"%011o\x00" % self.clamp
        return True

    def _needs_owner(self, entry: tf.RawEntry) -> bool:
        """With all_root: whether the entry's headers name an owner other than root."""
        if not self.all_root:
            return False
        if entry.pax is not None and any(k in entry.pax for k in _OWNER_RECORDS):
            return True
        view = self.w.view  # the tools read numeric owners only: names are left alone
        return (
            tf.parse_number(bytes(view[entry.header + 108 : entry.header + 116])) != 0
            or tf.parse_number(bytes(view[entry.header + 116 : entry.header + 124])) != 0
        )

    def _rooted(self, block: bytearray) -> None:
        """With all_root: make the header's owner root (numeric ids 0, no names)."""
        if self.all_root:
            block[108:124] = _ROOT_IDS
            block[265:329] = bytes(64)

    def _needs_clamp(self, entry: tf.RawEntry) -> bool:
        if self.clamp is None:
            return False
        if entry.pax is not None and b"mtime" in entry.pax:
            return True
        view = self.w.view
        return tf.parse_number(bytes(view[entry.header + 136 : entry.header + 148])) > self.clamp

    def _export_entry(self, entry: tf.RawEntry, path: str) -> None:
        self._parents(path)
        size = entry.size
        typeflag = entry.typeflag
        meta = self.dir_meta.get(path) if typeflag == tf.DIRECTORY else None
        if meta is not None:  # a directory laid over this one later: its metadata, here
            self.w.write(_merged_directory(entry, meta, self.mtime))
        elif typeflag == tf.HARDLINK:
            typeflag, size = self._hardlink(entry, path)
        elif path == CONSOLE and entry.is_regular and entry.size == 0:
            block = tf.header_block(self.w.view, entry)
            self.w.write(
                tf.entry_headers(
                    name=entry.name,
                    typeflag=tf.CHARDEV,
                    mode=0o600,
                    mtime=self._mtime_of(block),
                    devmajor=5,
                    devminor=1,
                )
            )
            typeflag = tf.CHARDEV
        elif path in self.plan.restore and entry.is_regular and entry.size == 0:
            content = self.plan.restore[path]
            block = tf.header_block(self.w.view, entry)
            tf.set_field(block, "size", len(content))
            tf.set_field(block, "mode", 0o644)  # the export shows Docker's bind-mount 0755
            clamped = self._clamped(block)
            owned = self._needs_owner(entry)
            self._rooted(block)
            if entry.pax is not None and (b"size" in entry.pax or clamped or owned):
                self.w.write(_rebuilt(entry, block, drop=(b"size", *self.no_mtime, *self.no_owner)))
            else:
                tf.set_checksum(block)
                self.w.copy(entry.start, entry.header)
                self.w.write(bytes(block))
            self.w.write(content + bytes(tf.padded(len(content)) - len(content)))
            size = len(content)
            self.stats.restored.append(path)
        elif path in ENGINE_ETC_FILES and entry.is_regular and entry.size == 0:
            block = tf.header_block(self.w.view, entry)
            tf.set_field(block, "mode", 0o644)  # Docker's bind-mount target shows as 0755
            self._clamped(block)
            self._rooted(block)
            self.w.write(_rebuilt(entry, block, drop=(*self.no_mtime, *self.no_owner)))
        elif (
            (entry.pax is not None and _needs_charset(entry.pax))
            or self._needs_clamp(entry)
            or self._needs_owner(entry)
        ):
            block = tf.header_block(self.w.view, entry)
            self._clamped(block)
            self._rooted(block)
            self.w.write(_rebuilt(entry, block, drop=(*self.no_mtime, *self.no_owner)))
            self.w.copy(entry.data, entry.end)
        else:
            self.w.copy(entry.start, entry.end)
        self.stats.from_export += 1
        self._account(path, typeflag, size, len(entry.linkname))
        self.present[path] = typeflag == tf.DIRECTORY
        if typeflag != tf.DIRECTORY:
            self.link_names.setdefault(path, entry.name)

    def _hardlink(self, entry: tf.RawEntry, path: str) -> tuple[int, int]:
        """Write a hard link; returns the typeflag and data size it ended up with."""
        target = normalise(decode(entry.linkname))
        name = self.link_names.get(target)
        if name is None:
            return self._materialise(entry, path, target)
        block = tf.header_block(self.w.view, entry)
        mode = tf.parse_number(bytes(block[100:108]))
        fixed = bool(mode & tf.S_IFMT)
        if fixed:
            tf.set_field(block, "mode", mode & ~tf.S_IFMT)
            self.stats.hardlinks_fixed += 1
        has_size = tf.parse_number(bytes(block[124:136])) != 0
        if has_size:  # a link "with data" would make readers expect data that is not there
            tf.set_field(block, "size", 0)
        clamped = self._clamped(block)
        rebuild = bool(self.no_mtime) and clamped  # a PAX mtime record must go as well
        pax_size = entry.pax is not None and (
            b"size" in entry.pax or (rebuild and b"mtime" in entry.pax)
        )
        if name != entry.linkname or pax_size or (entry.pax and _needs_charset(entry.pax)):
            self.w.write(_rebuilt(entry, block, linkname=name, drop=(b"size", *self.no_mtime)))
        elif fixed or has_size or clamped:
            tf.set_checksum(block)
            self.w.copy(entry.start, entry.header)
            self.w.write(bytes(block))
        else:
            self.w.copy(entry.start, entry.end)
        return tf.HARDLINK, 0

    def _materialise(self, entry: tf.RawEntry, path: str, target: str) -> tuple[int, int]:
        """Write a link whose target was left out as the target itself, under the link's name."""
        source = self.plan.by_path.get(target)
        hops = 0
        while source is not None and source.typeflag == tf.HARDLINK and hops < 40:
            source = self.plan.by_path.get(normalise(decode(source.linkname)))
            hops += 1
        if source is None or source.typeflag == tf.HARDLINK:
            raise tf.TarError(
                f"the export tarball's hard link {path!r} points to {target!r}, "
                "which is not in the export"
            )
        block = tf.header_block(self.w.view, source)
        self._clamped(block)
        self._rooted(block)
        self.w.write(
            _rebuilt(source, block, name=entry.name, drop=(*self.no_mtime, *self.no_owner))
        )
        self.w.copy(source.data, source.end)
        self.link_names[target] = entry.name
        self.stats.links_materialised += 1
        return source.typeflag, source.size

    def _mtime_of(self, block: bytearray) -> int:
        mtime = tf.parse_number(bytes(block[136:148]))
        return mtime if self.clamp is None else min(mtime, self.clamp)

    def _generated(self, generated: Generated) -> None:
        if generated.typeflag == tf.DIRECTORY:
            if self.present.get(generated.path):
                return  # written already, with the last directory's metadata
            generated = self.dir_meta.get(generated.path, generated)
        self._parents(generated.path)
        self._emit_new(
            generated.path,
            generated.typeflag,
            generated.mode,
            generated.uid,
            generated.gid,
            generated.content,
            generated.target,
            generated.device,
        )

    def _emit_new(
        self,
        path: str,
        typeflag: int,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        content: bytes = b"",
        target: str = "",
        device: tuple[int, int] = (0, 0),
    ) -> None:
        name = encode(path)[1:]
        linkname = encode(target)
        self.w.write(
            tf.entry_headers(
                name=name,
                typeflag=typeflag,
                mode=mode,
                uid=uid,
                gid=gid,
                size=len(content),
                mtime=self.mtime,
                linkname=linkname,
                devmajor=device[0],
                devminor=device[1],
            )
        )
        if content:
            self.w.write(content + bytes(tf.padded(len(content)) - len(content)))
        self.stats.generated += 1
        self._account(path, typeflag, len(content), len(linkname))
        self.present[path] = typeflag == tf.DIRECTORY
        if typeflag != tf.DIRECTORY:
            self.link_names[path] = name


_OWNER_RECORDS = (b"uid", b"gid", b"uname", b"gname")
# A root-owned ustar header's uid and gid: 0, octal, NUL-terminated.
_ROOT_IDS = b"0000000\x00" * 2

# PAX records a merged directory entry sets itself (or must lose: times and owner names).
_MERGED_DROPS = frozenset(
    {
        b"path",
        b"linkpath",
        b"size",
        b"uid",
        b"gid",
        b"uname",
        b"gname",
        b"mtime",
        b"atime",
        b"ctime",
        b"hdrcharset",
    }
)


def _merged_directory(entry: tf.RawEntry, meta: Generated, mtime: int) -> bytes:
    """An export directory's entry with the owner, mode and time of the directory laid over
    it, as a second entry would give them; its other PAX records (xattrs) stay."""
    extra = {k: v for k, v in (entry.pax or {}).items() if k not in _MERGED_DROPS}
    return tf.entry_headers(
        name=entry.name,
        typeflag=tf.DIRECTORY,
        mode=meta.mode,
        uid=meta.uid,
        gid=meta.gid,
        mtime=mtime,
        extra=extra,
    )


def _needs_charset(records: dict[bytes, bytes]) -> bool:
    if records.get(b"hdrcharset") == b"BINARY":
        return False
    return any(tf.needs_binary_charset(records.get(k, b"")) for k in (b"path", b"linkpath"))


def _rebuilt(
    entry: tf.RawEntry,
    block: bytearray,
    *,
    name: bytes | None = None,
    linkname: bytes | None = None,
    drop: tuple[bytes, ...] = (),
) -> bytes:
    """Re-encode an entry's headers: its PAX records kept (GNU long names folded into PAX)."""
    name = entry.name if name is None else name
    linkname = entry.linkname if linkname is None else linkname
    records = {k: v for k, v in (entry.pax or {}).items() if k not in (b"path", b"linkpath", *drop)}
    if len(name) <= 100 and name.isascii():
        tf.set_name(block, name)
    else:
        tf.set_name(block, name[:100])
        records[b"path"] = name
    block[157:257] = linkname[:100].ljust(100, b"\x00")
    if len(linkname) > 100 or not linkname.isascii():
        records[b"linkpath"] = linkname
    if _needs_charset(records):
        records = {b"hdrcharset": b"BINARY", **records}
    tf.set_checksum(block)
    return (tf.pax_header(records, name) if records else b"") + bytes(block)
