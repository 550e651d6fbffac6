"""The debugfs commands of each patch operation, and the patch digest."""

from __future__ import annotations

from pathlib import Path

from rfs.fs.ext4ops import (
    AddName,
    Extent,
    Fields,
    Links,
    MakeDir,
    MakeNode,
    Patch,
    Remove,
    RemoveDir,
    RemoveXattr,
    SetXattr,
    Symlink,
    Write,
    commands,
    digest,
    unsafe,
)


def test_every_operation_has_its_command(tmp_path: Path) -> None:
    source = tmp_path / "archive"
    source.write_bytes(b"..content..")
    files = tmp_path / "files"
    files.mkdir()
    patch = Patch(
        [
            Remove("/a b"),
            RemoveDir("/d"),
            Write("/f", b"bytes"),
            Write("/g", Extent(source, 2, 7)),
            MakeDir("/d2"),
            Symlink("/l", "/t"),
            MakeNode("/dev/null", "char", (1, 3)),
            MakeNode("/dev/big", "block", (300, 70000)),
            MakeNode("/p", "fifo"),
            AddName("/f2", "/f"),
            Links("/f", 2),
            Fields("/f", "file", 0o4755, 1, 2, 3, 4, 5, new=True),
            SetXattr("/f", "security.capability", b"\x01\x02"),
            RemoveXattr("/f", "user.x"),
        ]
    )
    lines = commands(patch, files, 99)
    assert lines[:2] == ['rm "/a b"', 'rmdir "/d"']
    assert lines[2] == f'write "{files}/2" "/f"' and (files / "2").read_bytes() == b"bytes"
    assert (files / "3").read_bytes() == b"content"
    assert 'symlink "/l" "/t"' in lines
    big = lines.index('mknod "big" b 0 0')
    assert lines[big - 1 : big + 4] == [
        'cd "/dev"',
        'mknod "big" b 0 0',
        "cd /",
        'sif "/dev/big" block[0] 0',
        f'sif "/dev/big" block[1] {(70000 & 0xFF) | (300 << 8) | ((70000 & ~0xFF) << 12)}',
    ]
    assert 'sif "/dev/null" block[0] 259' in lines
    assert lines[lines.index('mknod "p" p') - 1 :][:3] == ['cd "/"', 'mknod "p" p', "cd /"]
    assert 'ln "/f" "/f2"' in lines and 'sif "/f" links_count 2' in lines
    assert 'sif "/f" mode 0104755' in lines and 'sif "/f" crtime @99' in lines
    assert 'sif "/f" atime @4' in lines and 'sif "/f" ctime @5' in lines
    assert lines[-2] == f'ea_set -f "{files}/12.xattr" "/f" "security.capability"'
    assert (files / "12.xattr").read_bytes() == b"\x01\x02"
    assert lines[-1] == 'ea_rm "/f" "user.x"'


def test_the_digest_follows_contents_not_where_they_sit(tmp_path: Path) -> None:
    source = tmp_path / "archive"
    source.write_bytes(b"xyz")
    by_bytes = digest(Patch([Write("/f", b"y")]), mtime=1)
    assert digest(Patch([Write("/f", Extent(source, 1, 1))]), mtime=1) == by_bytes
    assert digest(Patch([Write("/f", b"z")]), mtime=1) != by_bytes
    assert digest(Patch([Write("/f", b"y")]), mtime=2) != by_bytes
    xattr = Patch([SetXattr("/f", "security.capability", b"\x00")])
    assert digest(xattr) != digest(Patch([SetXattr("/f", "security.capability", b"\x01")]))


def test_names_libss_cannot_quote() -> None:
    assert unsafe('a"b') and unsafe("a\\b") and unsafe("a\nb") and unsafe("a\udcffb")
    assert not unsafe("/srv/a b/ça va")
