"""An export with layer diffs laid on it streams the tree the later export would hold."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from typing import Any

import pytest

from rfs.engine.layerdiff import Limit, normalise_layer
from rfs.fs.layered import Unlayerable
from rfs.fs.selection import Selection
from rfs.fs.tarstream import write_image_stream

Spec = tuple[str, str, Any]  # name, kind ("dir", "file", "sym", "link", "fifo"), data/target


def _tar(specs: Iterable[Spec], *, layer: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in specs:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = (0o755 if kind == "dir" else 0o644), 0
            data = None
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "file":
                data = value
                info.size = len(value)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, value
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, value
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if not layer:
        return buf.getvalue()
    out = io.BytesIO()
    normalise_layer(io.BytesIO(buf.getvalue()), out, Limit(1 << 20, 1000))
    return out.getvalue()


def _tree(stream: bytes) -> dict[str, tuple[Any, ...]]:
    found: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            found["/" + m.name.strip("/").removeprefix("./")] = (m.type, m.mode, data, m.linkname)
    return found


def _stream(export: bytes, layers: list[bytes]) -> dict[str, tuple[Any, ...]]:
    out = io.BytesIO()
    write_image_stream(
        io.BytesIO(export),
        Selection(),
        (),
        out,
        mtime=0,
        layers=[io.BytesIO(layer) for layer in layers],
    )
    return _tree(out.getvalue())


BASE: list[Spec] = [
    ("etc", "dir", None),
    ("etc/passwd", "file", b"root\n"),
    ("etc/conf", "file", b"old\n"),
    ("tree", "dir", None),
    ("tree/a", "file", b"a\n"),
    ("tree/deep", "dir", None),
    ("tree/deep/b", "file", b"b\n"),
    ("opaque", "dir", None),
    ("opaque/gone", "file", b"gone\n"),
    ("opaque/sub", "dir", None),
    ("opaque/sub/gone", "file", b"gone\n"),
    ("typed", "file", b"file\n"),
    ("wasdir", "dir", None),
    ("wasdir/x", "file", b"x\n"),
    ("bin", "dir", None),
    ("bin/tool", "file", b"tool\n"),
    ("bin/alias", "link", "bin/tool"),
]


def test_layers_give_the_tree_of_the_later_export() -> None:
    first = _tar(
        [
            ("etc/", "dir", None),
            ("etc/.wh.passwd", "file", b""),
            ("etc/conf", "file", b"new\n"),
            (".wh.tree", "file", b""),
            ("opaque/", "dir", None),
            ("opaque/.wh..wh..opq", "file", b""),
            ("opaque/sub/", "dir", None),
            ("opaque/sub/kept", "file", b"kept\n"),
            ("typed/", "dir", None),
            ("typed/inside", "file", b"in\n"),
            ("wasdir", "sym", "elsewhere"),
            ("new", "dir", None),
            ("new/one", "file", b"1\n"),
            ("new/two", "link", "new/one"),
            ("new/fifo", "fifo", None),
        ],
        layer=True,
    )
    second = _tar([("new/", "dir", None), ("new/three", "file", b"3\n")], layer=True)
    later = [s for s in BASE if not s[0].startswith(("etc/passwd", "tree", "opaque/", "wasdir"))]
    later = [s if s[0] != "etc/conf" else ("etc/conf", "file", b"new\n") for s in later]
    later = [s for s in later if s[0] != "typed"]
    later += [
        ("opaque/sub", "dir", None),
        ("opaque/sub/kept", "file", b"kept\n"),
        ("typed", "dir", None),
        ("typed/inside", "file", b"in\n"),
        ("wasdir", "sym", "elsewhere"),
        ("new", "dir", None),
        ("new/one", "file", b"1\n"),
        ("new/two", "link", "new/one"),
        ("new/fifo", "fifo", None),
        ("new/three", "file", b"3\n"),
    ]
    got = _stream(_tar(BASE), [first, second])
    assert got == _stream(_tar(later), [])
    assert "/opaque/gone" not in got and "/tree/deep/b" not in got and "/wasdir/x" not in got
    assert got["/bin/alias"][0] == tarfile.LNKTYPE  # an untouched link stays a link


@pytest.mark.parametrize(
    "layer",
    [
        [("bin/", "dir", None), ("bin/tool", "file", b"changed\n")],  # a linked file changes
        [("bin/", "dir", None), ("bin/.wh.alias", "file", b"")],  # one name of a link goes
        [("elsewhere", "link", "bin/tool")],  # a link to a file the layer does not hold
        [("etc/passwd/x", "file", b"")],  # below a file
    ],
)
def test_what_a_layer_cannot_say_exactly_is_refused(layer: list[Spec]) -> None:
    with pytest.raises(Unlayerable):
        _stream(_tar(BASE), [_tar(layer)])
