"""The export filter on synthetic tarballs: what it keeps, fixes, drops and adds."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from rfs.errors import ScriptError
from rfs.fs import tarformat as tf
from rfs.fs.tarstream import (
    OverlayEntry,
    Selection,
    StreamStats,
    overlay_entries_from_dir,
    write_image_stream,
)

MTIME = 1_700_000_000
CAP = bytes.fromhex("0100000200200000000000000000000000000000")


@dataclass
class Spec:
    """One synthetic export entry."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    pax: dict[str, str] | None = None
    dev: tuple[int, int] = (0, 0)


def D(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Spec:
    """A directory entry (a short name: the specs below read like a tree listing)."""
    return Spec(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)


def make_tar(specs: list[Spec], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tarball as `docker export` writes one (relative names, dirs without trailing slash)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tar:
        for spec in specs:
            info = tarfile.TarInfo(spec.name)
            info.type = spec.type
            info.mode = spec.mode
            info.uid, info.gid = spec.uid, spec.gid
            info.mtime = 1_600_000_000
            info.linkname = spec.link
            info.devmajor, info.devminor = spec.dev
            if spec.pax:
                info.pax_headers = spec.pax
            info.size = len(spec.data) if spec.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(spec.data) if spec.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def set_mode(archive: bytes, name: str, mode: int) -> bytes:
    """Patch one header's mode field (tarfile cannot write file-type bits into it)."""
    data = bytearray(archive)
    for entry in tf.index_archive(archive):
        if entry.name == name.encode():
            block = bytearray(data[entry.header : entry.header + tf.BLOCK])
            tf.set_field(block, "mode", mode)
            tf.set_checksum(block)
            data[entry.header : entry.header + tf.BLOCK] = block
    return bytes(data)


@dataclass
class Out:
    raw: bytes
    stats: StreamStats
    members: list[tarfile.TarInfo]
    data: dict[str, bytes]

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def get(self, name: str) -> tarfile.TarInfo:
        found = [m for m in self.members if m.name == name]
        assert found, f"{name} not in {self.names()}"
        return found[-1]


def run(
    archive: bytes,
    selection: Selection | None = None,
    overlays: list[OverlayEntry] | None = None,
    restore: dict[str, bytes] | None = None,
) -> Out:
    out = io.BytesIO()
    stats = write_image_stream(
        io.BytesIO(archive),
        selection or Selection(),
        overlays or [],
        out,
        mtime=MTIME,
        restore=restore,
    )
    raw = out.getvalue()
    members: list[tarfile.TarInfo] = []
    data: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", errors="surrogateescape") as tar:
        for member in tar:
            members.append(member)
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                data[member.name] = extracted.read()
    return Out(raw, stats, members, data)


BASE = [
    Spec(".dockerenv", mode=0o755),
    D("bin"),
    Spec("bin/busybox", data=b"\x7fELF" * 300, mode=0o755),
    Spec("bin/sh", tarfile.SYMTYPE, link="busybox", mode=0o777),
    D("dev"),
    Spec("dev/console", mode=0o755, uid=1000),
    D("etc"),
    Spec("etc/hostname", mode=0o644, uid=3, gid=4),
    Spec("etc/hosts", data=b"127.0.0.1 localhost\n"),
    Spec("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    D("usr", uid=7, gid=8, mode=0o750),
    D("usr/lib"),
    Spec("usr/lib/libc.so", data=b"libc" * 1000),
    D("usr/share"),
    Spec("usr/share/doc", data=b"doc"),
    D("var"),
    D("var/cache"),
    Spec("var/cache/apt.bin", data=b"cache"),
    Spec("var/x.pyc", data=b"pyc"),
    Spec("ping", data=b"ping", mode=0o4755, pax={"SCHILY.xattr.security.capability": CAP.decode()}),
]


def test_untouched_entries_pass_through_byte_for_byte() -> None:
    specs = [
        D("data", mode=0o2775, uid=2**31, gid=70000),
        Spec("data/owned", data=b"x" * 700, uid=1234, gid=5678),
        Spec("data/m0", data=b"secret", mode=0),
        Spec("data/cap", data=b"c", pax={"SCHILY.xattr.security.capability": CAP.decode()}),
        Spec("data/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        Spec("data/blk", tarfile.BLKTYPE, mode=0o660, dev=(259, 300)),
        Spec("data/fifo", tarfile.FIFOTYPE),
        Spec("data/" + "long" * 60, data=b"long name"),
        Spec("data/café", data=b"utf8"),
    ]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        archive = make_tar(specs, fmt)
        out = run(archive)
        body = tf.index_archive(archive)[-1].end
        assert out.raw[:body] == archive[:body]
        assert out.raw[body:] == bytes(1024)
        assert out.stats.entries == len(specs)
        assert out.stats.content_bytes == sum(len(s.data) for s in specs)
        assert out.get("data").uid == 2**31
        assert out.get("data").mode == 0o2775


def test_hardlink_mode_type_bits_are_cleared() -> None:
    archive = make_tar([Spec("a", data=b"content"), Spec("b", tarfile.LNKTYPE, link="a")])
    archive = set_mode(archive, "b", 0o100644)
    out = run(archive)
    link = out.get("b")
    assert link.islnk() and link.linkname == "a"
    assert link.mode == 0o644
    entry = tf.index_archive(out.raw)[1]
    raw_mode = tf.parse_number(out.raw[entry.header + 100 : entry.header + 108])
    assert raw_mode == 0o644  # the raw field, not just what tarfile reports
    assert out.stats.hardlinks_fixed == 1
    assert out.stats.inodes == 1


def test_fixed_drops_console_and_restore() -> None:
    out = run(make_tar(BASE), restore={"/etc/hostname": b"box\n", "/etc/hosts": b"ignored"})
    names = out.names()
    assert ".dockerenv" not in names
    console = out.get("dev/console")
    assert console.ischr() and (console.devmajor, console.devminor) == (5, 1)
    assert (console.mode, console.uid, console.gid) == (0o600, 0, 0)
    hostname = out.get("etc/hostname")
    assert out.data["etc/hostname"] == b"box\n"
    assert (hostname.mode, hostname.uid, hostname.gid) == (0o644, 3, 4)
    assert out.data["etc/hosts"] == b"127.0.0.1 localhost\n"  # not empty: export wins
    assert out.stats.restored == ["/etc/hostname"]
    assert out.get("ping").pax_headers["SCHILY.xattr.security.capability"] == CAP.decode()


def test_dev_without_console_gets_one() -> None:
    # podman export leaves /dev/console out; a rootfs needs it for init's first messages
    out = run(make_tar([D("dev"), D("etc")]))
    console = out.get("dev/console")
    assert console.ischr() and (console.devmajor, console.devminor) == (5, 1)
    assert (console.mode, console.uid, console.gid) == (0o600, 0, 0)
    assert "dev/console" not in run(make_tar([D("etc")])).names()
    assert (
        "dev/console"
        not in run(make_tar([D("dev"), D("etc")]), Selection(exclude=("/dev",))).names()
    )


def test_reserved_rfs_directory_is_dropped() -> None:
    specs = [D(".rfs"), Spec(".rfs/script.sh", data=b"#!/bin/sh\n"), Spec(".rfsx", data=b"k")]
    out = run(make_tar(specs))
    assert out.names() == [".rfsx"]
    assert out.stats.dropped == 2


def test_selection_keeps_includes_and_their_parents() -> None:
    selection = Selection(whole=False, include_files=("/etc/passwd",), include_dirs=("/usr/lib",))
    out = run(make_tar(BASE), selection)
    assert out.names() == ["etc", "etc/passwd", "usr", "usr/lib", "usr/lib/libc.so"]
    usr = out.get("usr")
    assert (usr.uid, usr.gid, usr.mode) == (7, 8, 0o750)  # the export's own parent entry
    assert out.stats.missing_includes == []


def test_missing_include_is_reported() -> None:
    selection = Selection(whole=False, include_files=("/etc/shadow",))
    out = run(make_tar(BASE), selection)
    assert out.stats.missing_includes == ["/etc/shadow"]


def test_exclude_globs_drop_subtrees() -> None:
    selection = Selection(exclude=("/var/cache", "*.pyc", "/usr/share/"))
    out = run(make_tar(BASE), selection)
    names = out.names()
    assert "var" in names
    assert not [n for n in names if n.startswith(("var/cache", "usr/share")) or n.endswith(".pyc")]
    assert "usr/lib/libc.so" in names


def test_link_to_dropped_target_carries_the_content() -> None:
    specs = [
        D("a"),
        Spec("a/orig", data=b"payload" * 100, mode=0o4750, uid=9, pax={"SCHILY.xattr.x": "v"}),
        D("b"),
        Spec("b/link1", tarfile.LNKTYPE, link="a/orig", mode=0o4750, uid=9),
        Spec("b/link2", tarfile.LNKTYPE, link="a/orig", mode=0o4750, uid=9),
    ]
    out = run(make_tar(specs), Selection(whole=False, include_dirs=("/b",)))
    assert out.names() == ["b", "b/link1", "b/link2"]
    first = out.get("b/link1")
    assert first.isreg() and out.data["b/link1"] == b"payload" * 100
    assert (first.mode, first.uid, first.pax_headers.get("SCHILY.xattr.x")) == (0o4750, 9, "v")
    second = out.get("b/link2")
    assert second.islnk() and second.linkname == "b/link1"
    assert out.stats.links_materialised == 1


def test_overlays_come_last_with_missing_parents() -> None:
    overlays = [
        OverlayEntry("/etc/resolv.conf", b"nameserver 10.0.0.1\n", 0o644),
        OverlayEntry("/opt/app/bin/tool", b"#!/bin/sh\n", 0o4755, uid=5, gid=6),
        OverlayEntry("/etc/passwd", b"root::0:0::/:/bin/sh\n", 0o600),
    ]
    out = run(make_tar(BASE), overlays=overlays)
    names = out.names()
    tail = names[-6:]
    assert tail == [
        "etc/resolv.conf",
        "opt",
        "opt/app",
        "opt/app/bin",
        "opt/app/bin/tool",
        "etc/passwd",
    ]
    assert names.count("etc/passwd") == 1  # the export's entry gave way
    for parent in ("opt", "opt/app", "opt/app/bin"):
        info = out.get(parent)
        assert info.isdir() and (info.mode, info.uid, info.mtime) == (0o755, 0, MTIME)
    tool = out.get("opt/app/bin/tool")
    assert (tool.mode, tool.uid, tool.gid, tool.mtime) == (0o4755, 5, 6, MTIME)
    assert out.data["etc/passwd"] == b"root::0:0::/:/bin/sh\n"
    assert out.stats.generated == 6


def test_create_paths_only_when_absent() -> None:
    selection = Selection(
        create_dirs=("/tmp", "/var/tmp", "/proc", "/etc"),
        create_files=("/etc/machine-id", "/etc/passwd"),
    )
    out = run(make_tar(BASE), selection)
    assert out.get("tmp").mode == 0o1777
    assert out.get("var/tmp").mode == 0o1777
    assert out.get("proc").mode == 0o755
    assert out.get("etc/machine-id").size == 0 and out.get("etc/machine-id").mode == 0o644
    assert out.names().count("etc") == 1
    assert out.data["etc/passwd"] == b"root:x:0:0::/root:/bin/sh\n"


def test_overlay_file_over_directory_drops_its_subtree() -> None:
    out = run(make_tar(BASE), overlays=[OverlayEntry("/usr/lib", b"flat", 0o644)])
    assert not [n for n in out.names() if n.startswith("usr/lib/")]
    assert out.data["usr/lib"] == b"flat"


def test_overlay_file_over_what_only_has_entries_below_it_drops_them() -> None:
    """An overlay at /new/x makes /new a directory without an entry of its own; a later file
    overlay at /new replaces it and what is below it (mke2fs made a corrupt image of both)."""
    out = run(
        make_tar(BASE),
        overlays=[OverlayEntry("/new/x", b"x", 0o644), OverlayEntry("/new", b"file", 0o644)],
    )
    assert "new/x" not in out.names() and out.data["new"] == b"file"
    # the same when the export has entries below a path it has no entry for
    out = run(
        make_tar([*BASE, Spec("loose/a", data=b"a")]),
        overlays=[OverlayEntry("/loose", b"file", 0o644)],
    )
    assert "loose/a" not in out.names() and out.data["loose"] == b"file"


def test_overlay_directory_over_directory_keeps_contents() -> None:
    out = run(
        make_tar(BASE), overlays=[OverlayEntry("/usr", None, 0o700, uid=1, gid=2, is_dir=True)]
    )
    assert "usr/lib/libc.so" in out.names()
    # one entry (tar2sqfs refuses a second), in the export's place, with the overlay's metadata
    assert out.names().count("usr") == 1 and out.names().index("usr") < out.names().index("usr/lib")
    usr = out.get("usr")
    assert (usr.mode, usr.uid, usr.gid, usr.mtime, usr.uname) == (0o700, 1, 2, MTIME, "")


def test_overlay_directory_at_root_writes_every_path_once() -> None:
    xattr = {"SCHILY.xattr.user.note": "kept"}
    specs = [*BASE, Spec("var/log", tarfile.DIRTYPE, mode=0o755, uid=9, pax=xattr)]
    overlays = [
        OverlayEntry("/opt/early", b"e", 0o644),  # /opt: an implicit parent, declared below
        OverlayEntry("/", None, 0o700, is_dir=True),  # the host directory's mode must not leak
        OverlayEntry("/etc", None, 0o755, is_dir=True),
        OverlayEntry("/etc/motd", b"hi\n", 0o644),
        OverlayEntry("/var", None, 0o755, is_dir=True),
        OverlayEntry("/var/log", None, 0o750, uid=4, is_dir=True),
        OverlayEntry("/opt", None, 0o711, uid=5, is_dir=True),
        OverlayEntry("/opt", None, 0o701, uid=6, is_dir=True),  # a second overlay: it wins
    ]
    out = run(make_tar(specs), overlays=overlays)
    names = out.names()
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {"etc/passwd", "etc/motd", "var/cache/apt.bin", "opt/early"} <= set(names)
    assert (out.get("etc").mode, out.get("etc").mtime) == (0o755, MTIME)
    log = out.get("var/log")
    assert (log.mode, log.uid) == (0o750, 4) and log.pax_headers.get("SCHILY.xattr.user.note")
    opt = out.get("opt")
    assert (opt.mode, opt.uid) == (0o701, 6) and names.index("opt") < names.index("opt/early")
    assert out.get("usr").mode == 0o750  # not overlaid: the export's own entry, untouched


def test_symlinked_directories_are_followed() -> None:
    specs = [
        D("usr"),
        D("usr/lib"),
        Spec("usr/lib/libc.so.6", data=b"libc"),
        Spec("usr/lib/other", data=b"other"),
        Spec("lib", tarfile.SYMTYPE, link="usr/lib"),
    ]
    selection = Selection(whole=False, include_files=("/lib/libc.so.6",))
    out = run(make_tar(specs), selection, overlays=[OverlayEntry("/lib/extra", b"e", 0o644)])
    assert out.names() == ["usr", "usr/lib", "usr/lib/libc.so.6", "lib", "usr/lib/extra"]


def test_non_utf8_pax_path_is_marked_binary() -> None:
    archive = make_tar([Spec("x\udcffy", data=b"bad name")])
    out = run(archive)
    assert b"hdrcharset=BINARY" in out.raw
    assert out.names() == ["x\udcffy"]


def test_long_and_odd_names_in_overlays_and_links() -> None:
    long_dir = "/d" + "e" * 120
    overlays = [OverlayEntry(long_dir + "/f\udcfe", b"1", 0o644), OverlayEntry("/ü", b"2", 0o644)]
    out = run(make_tar([]), overlays=overlays)
    assert out.names() == [long_dir[1:], long_dir[1:] + "/f\udcfe", "ü"]


def test_export_from_a_real_file_matches_in_memory(tmp_path: Path) -> None:
    archive = make_tar(BASE)
    export = tmp_path / "export.tar"
    export.write_bytes(archive)
    expected = run(archive, Selection(exclude=("/var",)), restore={"/etc/hostname": b"h\n"}).raw
    with export.open("rb") as src, (tmp_path / "out.tar").open("wb") as dst:
        write_image_stream(
            src,
            Selection(exclude=("/var",)),
            [],
            dst,
            mtime=MTIME,
            restore={"/etc/hostname": b"h\n"},
        )
    assert (tmp_path / "out.tar").read_bytes() == expected


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (b"not a tar" * 100, "not a tar archive"),
        (make_tar(BASE)[:3000], "truncated"),
    ],
    ids=["garbage", "truncated"],
)
def test_damaged_exports_are_refused(archive: bytes, message: str) -> None:
    with pytest.raises(tf.TarError, match=message):
        run(archive)


@pytest.mark.parametrize("destination", ["etc/x", "/etc/../x", "/a\x00b"])
def test_bad_overlay_destinations_are_refused(destination: str) -> None:
    with pytest.raises(ScriptError):
        run(make_tar(BASE), overlays=[OverlayEntry(destination, b"", 0o644)])


def test_overlay_entries_from_dir(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir(mode=0o700)
    (tmp_path / "b" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "b" / "run.sh").chmod(0o700)
    (tmp_path / "a.conf").write_text("x=1\n")
    (tmp_path / "a.conf").chmod(0o600)
    (tmp_path / "link").symlink_to("/etc/os-release")
    entries = overlay_entries_from_dir(tmp_path, "/etc/app")
    assert [(e.destination, e.mode, e.is_dir, e.symlink) for e in entries] == [
        ("/etc/app", 0o755, True, None),
        ("/etc/app/a.conf", 0o644, False, None),
        ("/etc/app/b", 0o755, True, None),
        ("/etc/app/b/run.sh", 0o755, False, None),
        ("/etc/app/link", 0o777, False, "/etc/os-release"),
    ]
    out = run(make_tar(BASE), overlays=entries)
    assert out.get("etc/app/link").issym() and out.get("etc/app/link").linkname == "/etc/os-release"
    kept = overlay_entries_from_dir(tmp_path, "/x", keep_modes=True, uid=3)
    assert [e.mode for e in kept[1:4]] == [0o600, 0o700, 0o700] and kept[1].uid == 3
    forced = overlay_entries_from_dir(tmp_path, "/y", mode=0o640)
    assert [e.mode for e in forced[:4]] == [0o750, 0o640, 0o750, 0o640]


def test_dot_slash_names_and_trailing_slashes_compare_equal() -> None:
    specs = [
        D("./", mode=0o700),
        D("./etc/"),
        Spec("./etc/passwd", data=b"root\n"),
        Spec("./etc/shadow", data=b"x"),
        Spec("./etc/passwd-", tarfile.LNKTYPE, link="./etc/passwd"),
    ]
    selection = Selection(whole=False, include_files=("/etc/passwd/", "//etc/./passwd-"))
    out = run(make_tar(specs), selection, overlays=[OverlayEntry("/etc/passwd", b"new\n", 0o644)])
    assert out.names() == [".", "./etc", "./etc/passwd-", "etc/passwd"]
    assert out.get(".").mode == 0o700  # the root entry is kept: it carries the root's mode
    assert out.get("./etc/passwd-").isreg()  # its target gave way to the overlay
    assert out.data["./etc/passwd-"] == b"root\n"
    assert out.data["etc/passwd"] == b"new\n"


def test_pax_global_header_stays_in_place() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.pax_headers = {"comment": "made by a test"}
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    out = run(buf.getvalue())
    assert (
        out.raw[: tf.index_archive(buf.getvalue())[-1].end]
        == buf.getvalue()[: tf.index_archive(buf.getvalue())[-1].end]
    )
    assert out.stats.entries == 1
