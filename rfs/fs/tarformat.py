"""Byte-level tar: index an archive's entries and build or patch headers.

Just enough of ustar, PAX and GNU tar to filter a stream without re-encoding it: every field rfs
does not need stays as the original bytes, so a kept entry can be written out exactly as it came
in (owners, large ids, all mode bits and `SCHILY.xattr.*` records survive untouched).
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from rfs.errors import RfsError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# Typeflags, as the int a header byte indexes to.
REGULAR = ord("0")
REGULAR_OLD = 0  # pre-POSIX regular file: NUL typeflag
HARDLINK = ord("1")
SYMLINK = ord("2")
CHARDEV = ord("3")
BLOCKDEV = ord("4")
DIRECTORY = ord("5")
FIFO = ord("6")
CONTIGUOUS = ord("7")
PAX_LOCAL = ord("x")
PAX_GLOBAL = ord("g")
GNU_LONGNAME = ord("L")
GNU_LONGLINK = ord("K")

REGULAR_TYPES = frozenset({REGULAR, REGULAR_OLD, CONTIGUOUS})
# Types whose size field never announces data (as in Go's archive/tar, which wrote the export,
# and Python's tarfile); anything unknown is assumed to carry `size` bytes.
HEADER_ONLY_TYPES = frozenset({HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO})
_EXTENSION_TYPES = frozenset({PAX_LOCAL, GNU_LONGNAME, GNU_LONGLINK})

S_IFMT = 0o170000
_USTAR_MAGIC = b"ustar\x00"  # POSIX ustar/PAX; GNU's "ustar  \0" has no prefix field
_RELEASE_EVERY = 32 << 20
_MAX_OCTAL_ID = 0o7777777  # 7 digits: the widest id a plain ustar field holds
_MAX_OCTAL_SIZE = 0o77777777777


# What an archive is read from: the mmap of an export file, or bytes in memory (tests).
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap


class Sliceable(Protocol):
    """Anything whose byte ranges can be read by slicing (rfs.fs.layered.Segments)."""

    def __getitem__(self, where: slice, /) -> memoryview: ...


class TarError(RfsError):
    """The export tarball is damaged or is not a tar archive."""


def padded(size: int) -> int:
    """Return `size` rounded up to whole 512-byte blocks."""
    return (size + BLOCK - 1) & ~(BLOCK - 1)


def parse_number(field: bytes) -> int:
    """Decode a numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:  # negative in base-256 (only ever seen in mtimes)
            value -= 256 ** (len(field) - 1)
        return value
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise TarError(f"bad numeric field {field!r} in a tar header") from exc


def checksum(block: bytes) -> int:
    """Return the header checksum: the byte sum with the checksum field read as spaces."""
    return sum(block) - sum(block[148:156]) + 8 * 0x20


def set_checksum(block: bytearray) -> None:
    """Recompute and store the checksum of a header block in place."""
    block[148:156] = b"%06o\x00 " % checksum(bytes(block))


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Parse PAX extended header records ("LEN key=value\\n")."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding some writers leave
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise TarError("bad PAX record length in a tar header") from exc
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarError("malformed PAX record in a tar header")
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        pos += length
    return records


def pax_header(records: dict[bytes, bytes], name: bytes) -> bytes:
    """Build a PAX 'x' header (header block plus padded record data) holding `records`."""
    body = bytearray()
    for key, value in records.items():
        payload = b" " + key + b"=" + value + b"\n"
        length = len(payload) + 1
        # The length counts its own digits; one more digit may be needed once it is prefixed.
        while len(str(length)) + len(payload) != length:
            length = len(str(length)) + len(payload)
        body += str(length).encode() + payload
    header = build_header(
        name=b"PaxHeaders/" + name[-80:], typeflag=PAX_LOCAL, mode=0o644, size=len(body)
    )
    return header + bytes(body) + bytes(padded(len(body)) - len(body))


def build_header(
    *,
    name: bytes,
    typeflag: int,
    mode: int,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """Build one ustar header block; values that do not fit must go in a PAX header too."""
    block = bytearray(BLOCK)
    block[0:100] = name[:100].ljust(100, b"\x00")
    block[100:108] = _octal(mode & 0o7777777, 8)
    block[108:116] = _octal(uid if uid <= _MAX_OCTAL_ID else 0, 8)
    block[116:124] = _octal(gid if gid <= _MAX_OCTAL_ID else 0, 8)
    block[124:136] = _octal(size if size <= _MAX_OCTAL_SIZE else 0, 12)
    block[136:148] = _octal(mtime if 0 <= mtime <= _MAX_OCTAL_SIZE else 0, 12)
    block[156] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\x00")
    block[257:265] = _USTAR_MAGIC + b"00"
    block[329:337] = _octal(devmajor, 8)
    block[337:345] = _octal(devminor, 8)
    set_checksum(block)
    return bytes(block)


def needs_binary_charset(value: bytes) -> bool:
    """True if a PAX path value is not UTF-8, so readers must be told it is raw bytes."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def entry_headers(
    *,
    name: bytes,
    typeflag: int,
    mode: int,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    extra: dict[bytes, bytes] | None = None,
) -> bytes:
    """Build the header(s) of a new entry: a PAX header first whenever ustar cannot hold it.

    Non-ASCII names always go in PAX records, as Go's archive/tar writes them, and non-UTF-8
    ones are marked `hdrcharset=BINARY` (mke2fs's libarchive rejects them otherwise).
    """
    records: dict[bytes, bytes] = dict(extra or {})
    if len(name) > 100 or not name.isascii():
        records[b"path"] = name
    if len(linkname) > 100 or not linkname.isascii():
        records[b"linkpath"] = linkname
    if uid > _MAX_OCTAL_ID:
        records[b"uid"] = str(uid).encode()
    if gid > _MAX_OCTAL_ID:
        records[b"gid"] = str(gid).encode()
    if size > _MAX_OCTAL_SIZE:
        records[b"size"] = str(size).encode()
    if not 0 <= mtime <= _MAX_OCTAL_SIZE:
        records[b"mtime"] = str(mtime).encode()
    if any(needs_binary_charset(records.get(k, b"")) for k in (b"path", b"linkpath")):
        records = {b"hdrcharset": b"BINARY", **records}
    header = build_header(
        name=name,
        typeflag=typeflag,
        mode=mode,
        uid=uid,
        gid=gid,
        size=size,
        mtime=mtime,
        linkname=linkname,
        devmajor=devmajor,
        devminor=devminor,
    )
    return (pax_header(records, name) if records else b"") + header


@dataclass(slots=True)
class RawEntry:
    """One archive member as found in the export: where its bytes are and what they say."""

    start: int  # offset of its first extension header (== header if it has none)
    header: int  # offset of its main header block
    data: int  # offset of its data
    size: int  # bytes of data (a PAX `size` record applied)
    end: int  # offset just past its padded data
    typeflag: int
    name: bytes  # full raw name: PAX path, else GNU long name, else ustar prefix/name
    linkname: bytes  # for hard links and symlinks only (b"" otherwise)
    pax: dict[bytes, bytes] | None  # its local PAX records, if any
    has_gnu_long: bool  # a GNU 'L'/'K' header precedes it

    @property
    def is_regular(self) -> bool:
        """True for regular-file entries (not hard links)."""
        return self.typeflag in REGULAR_TYPES


def _cstring(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def index_archive(buf: Buffer) -> list[RawEntry]:
    """Index every entry of a tar archive held in `buf` (a mmap or bytes), in archive order.

    PAX global headers are returned as entries of their own (typeflag 'g') so they can be
    passed through in place. Raises TarError on a damaged or truncated archive.
    """
    with memoryview(buf) as base, base.cast("B") as view:
        return _index(view, buf.madvise if isinstance(buf, mmap.mmap) else None)


# index_archive of files, by identity: one build reads the same export in several steps (each
# later command's diff step checks the chain against it, the assembly plans it, the filter
# streams it), and its headers are parsed once. A file rewritten gets a new inode or mtime.
_INDEXED: OrderedDict[tuple[int, int, int, int], list[RawEntry]] = OrderedDict()
_INDEXED_MAX = 4
_INDEXED_LOCK = threading.Lock()


def index_file(fd: int, buf: Buffer) -> list[RawEntry]:
    """index_archive of `buf`, the whole of the regular file open as `fd`, remembered for the
    process by the file's identity (device, inode, size, mtime). The entries are shared: a
    caller must not change them."""
    st = os.fstat(fd)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _INDEXED_LOCK:
        found = _INDEXED.get(identity)
        if found is not None:
            _INDEXED.move_to_end(identity)
            return list(found)
    entries = index_archive(buf)
    with _INDEXED_LOCK:
        _INDEXED[identity] = entries
        while len(_INDEXED) > _INDEXED_MAX:
            _INDEXED.popitem(last=False)
    return list(entries)


def _number(field: bytes) -> int:
    """parse_number, with a fast path for the common plain octal field."""
    if field[0] < 0x80:
        try:  # try/except, not contextlib.suppress: this runs twice per header
            return int(field.partition(b"\x00")[0] or b"0", 8)
        except ValueError:
            pass
    return parse_number(field)


def _checksum_ok(block: bytes) -> bool:
    """Verify a header checksum; adler32's low half is 1 + the byte sum mod 65521, in C."""
    try:
        stored = _number(block[148:156])
    except TarError:
        return False
    field_sum = sum(block[148:156])
    return (stored - 8 * 0x20 + field_sum + 1) % 65521 == zlib.adler32(block) & 0xFFFF


def _index(view: memoryview, madvise: Callable[[int, int, int], None] | None) -> list[RawEntry]:
    total = len(view)
    released = 0  # pages of a mmap before this offset were handed back
    entries: list[RawEntry] = []
    append = entries.append
    pos = 0
    ext_start = -1
    pax: dict[bytes, bytes] | None = None
    longname: bytes | None = None
    longlink: bytes | None = None
    complete = False
    while pos + BLOCK <= total:
        block = bytes(view[pos : pos + BLOCK])
        if block == ZERO_BLOCK:
            complete = ext_start < 0
            break
        if not _checksum_ok(block):
            what = "is not a tar archive" if pos == 0 else f"has a bad header at byte {pos}"
            raise TarError(f"the export tarball {what}")
        typeflag = block[156]
        size = _number(block[124:136])
        if typeflag in _EXTENSION_TYPES or typeflag == PAX_GLOBAL:
            data_end = pos + BLOCK + size
            if data_end > total:
                break
            payload = bytes(view[pos + BLOCK : data_end])
            end = pos + BLOCK + padded(size)
            if typeflag == PAX_GLOBAL:
                append(RawEntry(pos, pos, pos + BLOCK, size, end, typeflag, b"", b"", None, False))
            else:
                if ext_start < 0:
                    ext_start = pos
                if typeflag == PAX_LOCAL:
                    pax = {**(pax or {}), **parse_pax(payload)}
                elif typeflag == GNU_LONGNAME:
                    longname = _cstring(payload)
                else:
                    longlink = _cstring(payload)
            pos = end
            continue
        if pax is not None and b"path" in pax:
            name = pax[b"path"]
        elif longname is not None:
            name = longname
        else:
            cut = block.find(b"\x00", 0, 100)
            name = block[: cut if cut >= 0 else 100]
            if block[345] != 0 and block[257:263] == _USTAR_MAGIC:
                name = _cstring(block[345:500]) + b"/" + name
        linkname = b""
        if typeflag in (HARDLINK, SYMLINK):
            if pax is not None and b"linkpath" in pax:
                linkname = pax[b"linkpath"]
            elif longlink is not None:
                linkname = longlink
            else:
                linkname = _cstring(block[157:257])
        if pax is not None and b"size" in pax:
            size = int(pax[b"size"])
        if typeflag in HEADER_ONLY_TYPES:
            size = 0
        end = pos + BLOCK + padded(size)
        if end > total:
            break
        append(
            RawEntry(
                pos if ext_start < 0 else ext_start,
                pos,
                pos + BLOCK,
                size,
                end,
                typeflag,
                name,
                linkname,
                pax,
                longname is not None or longlink is not None,
            )
        )
        pos = end
        ext_start, pax, longname, longlink = -1, None, None, None
        if madvise is not None and pos - released >= _RELEASE_EVERY:
            # Unmap what was read (it stays in the page cache): keeps RSS flat on big exports.
            upto = pos & ~(mmap.PAGESIZE - 1)
            madvise(mmap.MADV_DONTNEED, released, upto - released)
            released = upto
    else:
        # No end-of-archive blocks: tolerated (as GNU tar does) if the last entry is whole.
        complete = pos == total and pos > 0 and ext_start < 0
    if not complete:
        raise TarError(f"the export tarball is truncated (at byte {pos} of {total})")
    return entries


def header_block(buf: Buffer | Sliceable, entry: RawEntry) -> bytearray:
    """Return a mutable copy of an entry's main header block."""
    return bytearray(buf[entry.header : entry.header + BLOCK])


def set_name(block: bytearray, name: bytes) -> None:
    """Store a name that fits ustar's 100-byte field, clearing any ustar prefix."""
    block[0:100] = name[:100].ljust(100, b"\x00")
    if block[257:263] == _USTAR_MAGIC:
        block[345:500] = bytes(155)


def set_field(block: bytearray, field: str, value: int) -> None:
    """Store an octal numeric field ('mode', 'uid', 'gid', 'size', 'devmajor', 'devminor')."""
    start, width = _FIELDS[field]
    block[start : start + width] = _octal(value, width)


_FIELDS = {
    "mode": (100, 8),
    "uid": (108, 8),
    "gid": (116, 8),
    "size": (124, 12),
    "devmajor": (329, 8),
    "devminor": (337, 8),
}
