"""Property tests: whatever document, package or tarball rfs is given, the only outcomes are a
result or an RfsError (a message and an exit code), never another exception.

- `parse_script` gets documents shaped like build scripts with arbitrary values in every field;
- `rfs.script.package.load` gets those documents written as TOML and YAML, and damaged bytes;
- `rfs.script.package.load` gets package tarballs of arbitrary members (names with `..`,
  absolute names, symlinks and hard links anywhere): an accepted one never puts a file
  outside its directory;
- the tar filter (`write_image_stream`) gets arbitrary, possibly damaged, export tarballs with
  arbitrary selections and overlays: what it writes is a tar archive whose names all stay
  inside the image.

RFS_FUZZ_EXAMPLES raises the number of examples (default 150 per property, a few seconds each).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfs.errors import RfsError
from rfs.fs.tarstream import OverlayEntry, Selection, write_image_stream
from rfs.script.model import BuildScript
from rfs.script.package import load
from rfs.script.schema import _KEYS, parse_script

EXAMPLES = int(os.environ.get("RFS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# -- documents ------------------------------------------------------------------------------

_PATHS = [
    "/a",
    "/../x",
    "/",
    "",
    " ",
    "a/b",
    "/a/./b//",
    "..",
    "/etc/x\x00y",
    "/s.sh",
    "/d",
    "/etc/motd",
    "ext4",
    "Podman",
    "docker",
    "Squashfs",
    "/var/run/docker.sock",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(_PATHS),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _table(section: str, **special: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A table with any subset of the section's real keys (so the fuzzing reaches every
    field), each holding anything, plus now and then an unknown key."""
    fields = {key: special.get(key, anything) for key in _KEYS[section]}
    return st.one_of(
        st.fixed_dictionaries({}, optional=fields),
        st.builds(
            lambda d, extra: {**d, **extra},
            st.fixed_dictionaries({}, optional=fields),
            st.dictionaries(st.text(max_size=5), anything, max_size=2),
        ),
        anything,
    )


_strings = st.dictionaries(
    st.text(max_size=6), st.one_of(scalars, st.sampled_from(_PATHS)), max_size=3
)
_pathset = st.fixed_dictionaries(
    {},
    optional={
        k: st.one_of(st.lists(st.one_of(st.sampled_from(_PATHS), scalars), max_size=3), anything)
        for k in ("include", "create", "exclude")
    },
)
documents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "filesystem": _table("filesystem"),
            "container": _table("container", image=_table("image"), volumes=_strings, env=_strings),
            "commands": st.one_of(st.lists(_table("commands", env=_strings), max_size=3), anything),
            "overlays": st.one_of(st.lists(_table("overlays"), max_size=3), anything),
            "export": st.one_of(
                st.fixed_dictionaries({}, optional={"files": _pathset, "directories": _pathset}),
                anything,
            ),
        },
    ),
    anything,
)


@FUZZ
@given(documents)
def test_parse_script_gives_a_model_or_a_script_error(doc: Any) -> None:
    try:
        script, warnings = parse_script(doc)
    except RfsError as exc:
        assert exc.exit_code == 2 and exc.message
        return
    assert isinstance(script, BuildScript)
    assert all(w.severity == "warning" for w in warnings)


def toml_text(value: Any) -> str:
    """`value` (a table) as TOML with inline tables; None values are left out."""

    def emit(v: Any) -> str:
        if isinstance(v, dict):
            items = [f"{json.dumps(str(k))} = {emit(x)}" for k, x in v.items() if x is not None]
            return "{" + ", ".join(items) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(emit(x) for x in v if x is not None) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)  # nan and inf are TOML too; "1e+300" and the like as well
        return json.dumps(v)  # a JSON string is a TOML basic string, surrogates aside

    if not isinstance(value, dict):
        return f"value = {emit(value)}\n" if value is not None else ""
    return "".join(f"{json.dumps(str(k))} = {emit(v)}\n" for k, v in value.items() if v is not None)


def _load_outcome(package: Path) -> None:
    try:
        loaded = load(package)
    except RfsError as exc:
        assert exc.exit_code in (2, 3) and exc.message
        return
    assert isinstance(loaded.script, BuildScript)


@FUZZ
@given(doc=documents, yaml_form=st.booleans())
def test_load_gives_a_model_or_an_error(doc: Any, yaml_form: bool) -> None:
    import yaml

    with tempfile.TemporaryDirectory(prefix="rfs-fuzz-") as d:
        pkg = Path(d)
        (pkg / "s.sh").write_text("#!/bin/sh\ntrue\n")
        (pkg / "d").mkdir()
        if yaml_form:
            (pkg / "build.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        else:
            (pkg / "build.toml").write_text(toml_text(doc), errors="surrogatepass")
        _load_outcome(pkg)


VALID = (
    b'[filesystem]\nsize_mib = 64\n[container]\nimage = { name = "busybox", tag = "1" }\n'
    b'[[commands]]\nscript_path = "/s.sh"\n[[overlays]]\nsource = "/d"\n'
    b'destination = "/etc/d"\nis_directory = true\n'
)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.binary(max_size=3)), max_size=4),
    suffix=st.sampled_from(["build.toml", "build.yaml"]),
)
def test_load_of_damaged_bytes_gives_a_model_or_an_error(
    edits: list[tuple[int, bytes]], suffix: str
) -> None:
    raw = bytearray(VALID)
    for pos, new in edits:
        raw[pos : pos + len(new)] = new
    with tempfile.TemporaryDirectory(prefix="rfs-fuzz-") as d:
        pkg = Path(d)
        (pkg / "s.sh").write_text("#!/bin/sh\ntrue\n")
        (pkg / "d").mkdir()
        (pkg / suffix).write_bytes(bytes(raw))
        _load_outcome(pkg)


# -- tarballs -------------------------------------------------------------------------------

_segment = st.one_of(
    st.sampled_from(
        ["etc", "a", "b", "..", ".", "", "dev", "console", ".rfs", ".dockerenv", "tmp", "d"]
    ),
    st.text(alphabet="ab\u00e9-", min_size=1, max_size=3),
)
tar_path = st.one_of(
    st.lists(_segment, min_size=1, max_size=4).map("/".join),
    st.lists(_segment, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.just("x" * 120 + "/y" * 20),
)  # needs a long-name extension
_KINDS = [
    tarfile.REGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.FIFOTYPE,
    tarfile.CONTTYPE,
    b"Z",
]
member = st.tuples(
    tar_path,
    st.sampled_from(_KINDS),
    tar_path,
    st.binary(max_size=40),
    st.integers(0, 0o7777),
    st.booleans(),
)


@st.composite
def tarballs(draw: st.DrawFn, *, script: bytes | None = None) -> bytes:
    """A tar archive of arbitrary members in any of the three formats, maybe damaged."""
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if script is not None:
            info = tarfile.TarInfo("build.toml")
            info.size = len(script)
            tar.addfile(info, io.BytesIO(script))
        for name, kind, target, data, mode, xattr in draw(st.lists(member, max_size=8)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = target
            if xattr and fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"SCHILY.xattr.user.a": "v"}
            has_data = kind in (tarfile.REGTYPE, tarfile.CONTTYPE, b"Z")
            info.size = len(data) if has_data else 0
            try:
                tar.addfile(info, io.BytesIO(data) if has_data else None)
            except ValueError:  # a name the format cannot hold: leave it out
                continue
    raw = bytearray(buf.getvalue())
    for pos, value in draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=2)
    ):
        raw[pos] = value
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    return bytes(raw if cut is None else raw[:cut])


selections = st.builds(
    Selection,
    whole=st.booleans(),
    include_files=st.lists(tar_path, max_size=2).map(tuple),
    include_dirs=st.lists(tar_path, max_size=2).map(tuple),
    create_files=st.lists(tar_path, max_size=2).map(tuple),
    create_dirs=st.lists(tar_path, max_size=2).map(tuple),
    exclude=st.lists(tar_path, max_size=2).map(tuple),
)
overlays = st.builds(
    OverlayEntry,
    destination=tar_path,
    content=st.one_of(st.none(), st.binary(max_size=8)),
    mode=st.integers(-1, 0o10000),
    uid=st.integers(-1, 2**32),
    gid=st.just(0),
    is_dir=st.booleans(),
    symlink=st.one_of(st.none(), tar_path),
)


@FUZZ
@given(
    tarballs(),
    selections,
    st.lists(overlays, max_size=3),
    st.dictionaries(tar_path, st.binary(max_size=4), max_size=2),
)
def test_tar_filter_gives_a_stream_inside_the_image_or_an_error(
    export: bytes, selection: Selection, extra: list[OverlayEntry], restore: dict[str, bytes]
) -> None:
    out = io.BytesIO()
    try:
        write_image_stream(io.BytesIO(export), selection, extra, out, mtime=0, restore=restore)
    except RfsError as exc:
        assert exc.message
        return
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:") as tar:
        for info in tar.getmembers():
            # mke2fs places every name under the image root; `..` is the only way out.
            assert ".." not in info.name.split("/"), info.name
            if info.islnk():
                assert ".." not in info.linkname.split("/"), info.linkname


@FUZZ
@given(tarballs(script=b'[container]\nimage = { name = "busybox", tag = "1" }\n'))
def test_package_tarball_loads_inside_its_directory_or_fails(archive: bytes) -> None:
    from rfs.script.package import cleanup

    with tempfile.TemporaryDirectory(prefix="rfs-fuzz-") as d:
        base = Path(d)
        unpack = base / "unpack"  # $TMPDIR, where rfs unpacks package archives
        unpack.mkdir()
        (base / "pkg.tar").write_bytes(archive)
        old = tempfile.tempdir
        tempfile.tempdir = str(unpack)
        try:
            loaded = load(base / "pkg.tar")
        except RfsError as exc:
            assert exc.message
        else:
            root = loaded.script.package_root
            assert root is not None and unpack in root.parents
            for path in unpack.rglob("*"):  # nothing in it leads out of it
                if path.is_symlink():  # realpath: a link loop is not an error here
                    target = Path(os.path.realpath(path))
                    assert unpack in target.parents, (path, target)
        finally:
            tempfile.tempdir = old
            cleanup()  # what rfs does at exit
        # Nothing was written beside the archive, and the unpacked copy is gone.
        assert sorted(p.name for p in base.iterdir()) == ["pkg.tar", "unpack"]
        assert list(unpack.iterdir()) == []
