"""Bad input: every wrong build script or package gets one clear message naming the file and
the field (or the archive member), exit status 2, and no traceback.

Each case goes through the `rfs` command line (`rfs check --script-only`, in process) and, for
the failing ones, through `rfs.script.package.load` too, which the build itself uses.
"""

from __future__ import annotations

import dataclasses
import io
import socket
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rfs.cli import main
from rfs.errors import EXIT_BAD_INPUT, EXIT_OK, ScriptError
from rfs.script.package import load
from tests.packages import write_package
from tests.tarmembers import member_bytes

HEAD = '[container]\nimage = { name = "rfs-test/busybox", tag = "1" }\n'
YHEAD = "container:\n  image: {name: rfs-test/busybox, tag: '1'}\n"


@dataclass
class Case:
    """A package to write and what rfs must say about it."""

    files: dict[str, str | bytes]
    field: str  # the field path (or line, or archive member) the message must name
    says: str  # a fragment of the message
    script: str = "build.toml"  # the file the message must name
    warning: bool = False  # a warning (exit 0), not an error
    absent: tuple[str, ...] = ()  # text that must not appear (spurious follow-up errors)
    setup: Callable[[Path], None] | None = dataclasses.field(default=None, repr=False)


def toml(body: str, **files: str | bytes) -> dict[str, str | bytes]:
    return {"build.toml": HEAD + body, **files}


def _unix_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    finally:
        sock.close()


CASES: dict[str, Case] = {
    # -- documents that do not parse --------------------------------------------------------
    "toml syntax": Case({"build.toml": "[container\nimage = 1\n"}, "line 1", "invalid TOML"),
    "yaml syntax": Case(
        {"build.yaml": "container: [a\n"}, "line 2", "invalid YAML", script="build.yaml"
    ),
    "toml not utf-8": Case({"build.toml": b"\xff\xfe[container]\n"}, "byte 0", "is not UTF-8 text"),
    "yaml not utf-8": Case(
        {"build.yaml": b"container: \xe9\n"}, "byte 11", "is not UTF-8 text", script="build.yaml"
    ),
    "toml nested too deeply": Case(
        {"build.toml": "a = " + "[" * 5000 + "]" * 5000}, "invalid TOML", "nested too deeply"
    ),
    "yaml nested too deeply": Case(
        {"build.yaml": "a: " + "[" * 5000 + "]" * 5000},
        "invalid YAML",
        "nested too deeply",
        script="build.yaml",
    ),
    "toml absurd integer": Case(
        {"build.toml": HEAD + "[filesystem]\nsize_mib = 1" + "0" * 5000}, "invalid TOML", "digits"
    ),
    "yaml empty": Case({"build.yaml": ""}, "build.yaml", "is empty", script="build.yaml"),
    "yaml top-level list": Case(
        {"build.yaml": "- a\n- b\n"},
        "build.yaml",
        "must be a table at the top level, not a list",
        script="build.yaml",
    ),
    "yaml python tag": Case(
        {"build.yaml": "a: !!python/object/apply:os.system [true]\n"},
        "line 1",
        "could not determine a constructor",
        script="build.yaml",
    ),
    # -- wrong types -----------------------------------------------------------------------
    "size as text": Case(
        toml('[filesystem]\nsize_mib = "big"\n'),
        "filesystem.size_mib",
        "must be an integer, not a string",
    ),
    "size as boolean": Case(
        toml("[filesystem]\nsize_mib = true\n"),
        "filesystem.size_mib",
        "must be an integer, not a boolean",
    ),
    "rootful as text": Case(
        {"build.toml": HEAD.replace("\n", '\nrootful = "yes"\n', 1)},
        "container.rootful",
        "must be a boolean",
    ),
    "commands as text": Case(
        {"build.toml": 'commands = "ls"\n' + HEAD}, "commands", "must be an array of tables"
    ),
    "command as text": Case(
        {"build.toml": 'commands = ["ls"]\n' + HEAD}, "commands[0]", "must be a table, not a string"
    ),
    "env value as list": Case(
        {"build.toml": HEAD + "env = { A = [1] }\n"},
        "container.env.A",
        "must be a string, not a list",
    ),
    "volumes as list": Case(
        {"build.toml": HEAD + 'volumes = ["/a"]\n'},
        "container.volumes",
        "must be a table of strings",
    ),
    "cap_add as integer": Case(
        {"build.toml": HEAD + "cap_add = 3\n"}, "container.cap_add", "must be a list of strings"
    ),
    "mode as text": Case(
        toml('[[overlays]]\nsource_inline = "x"\ndestination = "/x"\nmode = "0644"\n'),
        "overlays[0].mode",
        "must be an integer",
    ),
    "yaml date as tag": Case(
        {"build.yaml": "container:\n  image: {name: a, tag: 2024-01-01}\n"},
        "container.image.tag",
        "must be a string, not date",
        script="build.yaml",
    ),
    "yaml bytes as script": Case(
        {"build.yaml": YHEAD + "commands:\n- script_inline: !!binary aGVsbG8=\n"},
        "commands[0].script_inline",
        "must be a string, not bytes",
        script="build.yaml",
    ),
    # -- missing required fields -----------------------------------------------------------
    "no container": Case(
        {"build.toml": "[filesystem]\nsize_mib = 8\n"}, "container", "is required"
    ),
    "no image tag": Case(
        {"build.toml": '[container]\nimage = { name = "a" }\n'},
        "container.image.tag",
        "is required",
    ),
    "overlay without destination": Case(
        toml('[[overlays]]\nsource_inline = "x"\n'),
        "overlays[0].destination",
        "is required",
        absent=("must name a file",),
    ),
    "overlay without source": Case(
        toml('[[overlays]]\ndestination = "/x"\n'),
        "overlays[0]",
        "needs exactly one of source, source_inline",
    ),
    "command without a form": Case(
        toml("[[commands]]\nuid = 1\n"),
        "commands[0]",
        "needs exactly one of command, script_inline, script_path",
    ),
    # -- unknown keys (warnings: buildfs ignores them too, but a typo must show) -------------
    "unknown key": Case(
        toml("[filesystem]\nsise_mib = 8\n"),
        "filesystem.sise_mib",
        "did you mean 'size_mib'",
        warning=True,
    ),
    "unknown table": Case(
        toml('[[comands]]\ncommand = "ls"\n'), "comands", "did you mean 'commands'", warning=True
    ),
    # -- conflicting fields ----------------------------------------------------------------
    "command and inline script": Case(
        toml('[[commands]]\ncommand = "ls"\nscript_inline = "ls"\n'),
        "commands[0]",
        "found: command, script_inline",
    ),
    "source and inline source": Case(
        toml('[[overlays]]\nsource = "/a"\nsource_inline = "x"\ndestination = "/x"\n', a="a"),
        "overlays[0]",
        "needs exactly one of source, source_inline",
    ),
    "directory with inline source": Case(
        toml('[[overlays]]\nsource_inline = "x"\ndestination = "/x"\nis_directory = true\n'),
        "overlays[0].is_directory",
        "cannot be used with source_inline",
    ),
    "block size not dividing": Case(
        toml("[filesystem]\nsize_mib = 10\nblock_size_mib = 4\n"),
        "filesystem.block_size_mib",
        "does not divide size_mib",
    ),
    # -- negative and absurd numbers -------------------------------------------------------
    "negative size": Case(
        toml("[filesystem]\nsize_mib = -1\n"), "filesystem.size_mib", "must be at least 1"
    ),
    "zero size": Case(
        toml("[filesystem]\nsize_mib = 0\n"), "filesystem.size_mib", "must be at least 1"
    ),
    "absurd size": Case(
        toml("[filesystem]\nsize_mib = 1099511627776\n"), "filesystem.size_mib", "must be at most"
    ),
    "negative uid": Case(
        toml('[[commands]]\ncommand = "ls"\nuid = -1\n'), "commands[0].uid", "must be at least 0"
    ),
    "mode out of range": Case(
        toml('[[overlays]]\nsource_inline = "x"\ndestination = "/x"\nmode = 0o77777\n'),
        "overlays[0].mode",
        "must be at most",
    ),
    "zero timeout": Case(
        {"build.toml": HEAD + "timeout = 0\n"}, "container.timeout", "must be at least 1"
    ),
    "negative stop wait": Case(
        {"build.toml": HEAD + "wait_timeout_s = -5\n"},
        "container.wait_timeout_s",
        "must be at least 0",
    ),
    # -- empty scripts ---------------------------------------------------------------------
    "empty command": Case(toml('[[commands]]\ncommand = ""\n'), "commands[0].command", "is empty"),
    "blank command": Case(
        toml('[[commands]]\ncommand = "  \\t "\n'), "commands[0].command", "is empty"
    ),
    "blank inline script": Case(
        toml('[[commands]]\nscript_inline = "\\n\\n"\n'), "commands[0].script_inline", "is empty"
    ),
    "empty script file": Case(
        toml('[[commands]]\nscript_path = "/s.sh"\n', **{"s.sh": ""}),
        "commands[0].script_path",
        "/s.sh is empty",
    ),
    "blank script file": Case(
        toml('[[commands]]\nscript_path = "/s.sh"\n', **{"s.sh": "\n  \n"}),
        "commands[0].script_path",
        "/s.sh is empty",
    ),
    # -- missing or wrong package files ----------------------------------------------------
    "missing script": Case(
        toml('[[commands]]\nscript_path = "/s.sh"\n'),
        "commands[0].script_path",
        "/s.sh not found in package",
    ),
    "missing overlay source": Case(
        toml('[[overlays]]\nsource = "/f/motd"\ndestination = "/etc/motd"\n'),
        "overlays[0].source",
        "/f/motd not found in package",
    ),
    "missing volume": Case(
        {"build.toml": HEAD + 'volumes = { "/data" = "/mnt" }\n'},
        "container.volumes./data",
        "/data not found in package",
    ),
    "script is a directory": Case(
        toml('[[commands]]\nscript_path = "/s"\n', **{"s/x": "x"}),
        "commands[0].script_path",
        "/s is not a regular file",
    ),
    "directory overlay on a file": Case(
        toml('[[overlays]]\nsource = "/f"\ndestination = "/x"\nis_directory = true\n', f="x"),
        "overlays[0].source",
        "/f is not a directory",
    ),
    "script named directly, reference missing beside it": Case(
        {"one.toml": HEAD + '[[commands]]\nscript_path = "/s.sh"\n'},
        "commands[0].script_path",
        "/s.sh not found in package",
        script="one.toml",
    ),
    # -- scripts that are not UTF-8 --------------------------------------------------------
    "script file not utf-8": Case(
        toml('[[commands]]\nscript_path = "/s.sh"\n', **{"s.sh": b"#!/bin/sh\necho \xff\n"}),
        "commands[0].script_path",
        "/s.sh is not UTF-8 text (byte 15)",
    ),
    # -- paths leading out of the package or the image -------------------------------------
    "script path with ..": Case(
        toml('[[commands]]\nscript_path = "/../../etc/passwd"\n'),
        "commands[0].script_path",
        "must not contain '..'",
    ),
    "overlay source symlinked out": Case(
        toml('[[overlays]]\nsource = "/f/motd"\ndestination = "/etc/motd"\n'),
        "overlays[0].source",
        "/f/motd leads outside the package",
        setup=lambda pkg: _symlink(pkg / "f" / "motd", "/etc/passwd"),
    ),
    "volume symlinked out": Case(
        {"build.toml": HEAD + 'volumes = { "/data" = "/mnt" }\n'},
        "container.volumes./data",
        "/data leads outside the package",
        setup=lambda pkg: _symlink(pkg / "data", "/"),
    ),
    "destination with ..": Case(
        toml('[[overlays]]\nsource_inline = "x"\ndestination = "/etc/../../x"\n'),
        "overlays[0].destination",
        "must not contain '..'",
        absent=("must name a file",),
    ),
    "working dir with ..": Case(
        toml('[[commands]]\ncommand = "ls"\nworking_dir = "/a/../.."\n'),
        "commands[0].working_dir",
        "must not contain '..'",
    ),
    "export include with ..": Case(
        toml('[export.files]\ninclude = ["/etc/../../x"]\n'),
        "export.files.include[0]",
        "must not contain '..'",
    ),
    "destination with NUL": Case(
        toml('[[overlays]]\nsource_inline = "x"\ndestination = "/etc/a\\u0000b"\n'),
        "overlays[0].destination",
        "NUL character",
    ),
    # -- duplicated destinations -----------------------------------------------------------
    # Overlays may share a destination (they merge in order); two bind mounts on one path may not.
    "same destination mounted twice": Case(
        toml(
            '[[overlays]]\nsource_inline = "a"\n'
            'destination = "/etc/x"\nmounted = true\n'
            '[[overlays]]\nsource_inline = "b"\n'
            'destination = "/etc/x"\nmounted = true\n'
        ),
        "overlays[1].mounted",
        "/etc/x is also where overlays[0] is mounted",
    ),
    "same mounted destination spelled differently": Case(
        toml(
            '[[overlays]]\nsource_inline = "a"\ndestination = "/etc/x"\nmounted = true\n'
            '[[overlays]]\nsource_inline = "b"\ndestination = "etc//./x/"\nmounted = true\n'
        ),
        "overlays[1].mounted",
        "/etc/x is also where overlays[0] is mounted",
    ),
    # -- the new recipe fields -------------------------------------------------------------
    "all_root on ext4": Case(
        toml("[filesystem]\nall_root = true\n"),
        "filesystem.all_root",
        "only Squashfs and Erofs images take it",
    ),
    "copy without commands": Case(
        toml('[[copy]]\nsource = "/f"\ndestination = "/f"\n'),
        "copy",
        "places files before the first command",
    ),
    "copy without destination": Case(
        toml('[[copy]]\nsource = "/f"\n'), "copy[0].destination", "is required"
    ),
    "output escaping the image directory": Case(
        toml('[[outputs]]\npath = "/etc/motd"\nto = "../motd"\n'),
        "outputs[0].to",
        "must be a file name relative to the image's directory",
    ),
    "two outputs to one file": Case(
        toml('[[outputs]]\npath = "/etc/a/motd"\n[[outputs]]\npath = "/etc/b/motd"\n'),
        "outputs[1].to",
        "motd is also where outputs[0] goes",
    ),
    "removing an overlay's file": Case(
        toml(
            '[[overlays]]\nsource_inline = "a"\ndestination = "/etc/x"\n'
            '[[outputs]]\npath = "/etc/x"\nremove = true\n'
        ),
        "outputs[0].remove",
        "is an overlay's destination",
    ),
    # -- the engine socket must never reach a build container ------------------------------
    "volume onto the docker socket": Case(
        {"build.toml": HEAD + 'volumes = { "/data" = "/var/run/docker.sock" }\n', "data": "x"},
        "container.volumes./data",
        "container engine's socket",
    ),
    "volume onto the podman socket": Case(
        {"build.toml": HEAD + 'volumes = { "/data" = "/run/podman/podman.sock" }\n', "data": "x"},
        "container.volumes./data",
        "container engine's socket",
    ),
    "volume that is a socket": Case(
        {"build.toml": HEAD + 'volumes = { "/s" = "/mnt/s" }\n'},
        "container.volumes./s",
        "/s is a socket",
        setup=lambda pkg: _unix_socket(pkg / "s"),
    ),
    "volume holding a socket": Case(
        {"build.toml": HEAD + 'volumes = { "/d" = "/mnt/d" }\n', "d/readme": "x"},
        "container.volumes./d",
        "/d/run/engine.sock is a socket",
        setup=lambda pkg: _unix_socket(_mkdir(pkg / "d" / "run") / "engine.sock"),
    ),
    # -- unknown enumerations --------------------------------------------------------------
    "unknown engine": Case(
        {"build.toml": HEAD + 'engine = "lxc"\n'}, "container.engine", "unknown value 'lxc'"
    ),
    "unknown filesystem": Case(
        toml('[filesystem]\ntype = "ntfs"\n'), "filesystem.type", "unknown value 'ntfs'"
    ),
}


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_case(root: Path, case: Case) -> Path:
    """Write `case`'s files under `root`; return what to pass to rfs (directory or file)."""
    write_package(root, None, case.files)
    if case.setup is not None:
        case.setup(root)
    if case.script not in SCRIPT_NAMES:
        return root / case.script  # the script named directly: its directory is the package
    return root


SCRIPT_NAMES = ("build.toml", "build.yaml")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="rfs-bad-") as d:
        yield Path(d)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_file_and_field(
    name: str, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    package = write_case(short_tmp / "pkg", case)
    code = main(["check", "--script-only", str(package)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    script_file = str(short_tmp / "pkg" / case.script)
    lines = [line for line in err.splitlines() if case.says in line]
    assert lines, f"{case.says!r} not in:\n{err}"
    # One line says it all: which file, which field, what is wrong.
    assert any(script_file in line and case.field in line for line in lines), err
    for text in case.absent:
        assert text not in err
    if case.warning:
        assert code == EXIT_OK
        assert "rfs: warning:" in lines[0]
        return
    assert code == EXIT_BAD_INPUT, err
    # The build reads the package through `load`: the same problem stops it there.
    with pytest.raises(ScriptError) as raised:
        load(package)
    assert any(case.says in str(p) and case.field in str(p) for p in raised.value.problems)


def test_the_build_refuses_bad_input_before_touching_anything(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rfs build` stops at the script: exit 2, no image, no cache written."""
    package = write_case(short_tmp / "pkg", CASES["destination with .."])
    out, cache = short_tmp / "out.ext4", short_tmp / "cache"
    code = main(["build", str(package), "-o", str(out), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "overlays[0].destination" in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_missing_package_is_a_usage_error(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", "--script-only", str(short_tmp / "nowhere")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"{short_tmp / 'nowhere'}: no such file or directory" in err


# -- package tarballs ------------------------------------------------------------------------


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, target: str = "", data: bytes = b"x"
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = target
        return info, None
    info.size = len(data)
    return info, data


TAR_CASES: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str, str]] = {
    # name: (extra members, member the message must name, fragment)
    "member with ..": ([_member("../evil")], "../evil", "leads outside the package"),
    "absolute member": ([_member("/etc/evil")], "/etc/evil", "absolute path"),
    "symlink pointing out": (
        [_member("files/link", tarfile.SYMTYPE, "/etc/passwd")],
        "files/link",
        "pointing out of the package",
    ),
    "relative symlink climbing out": (
        [_member("files/link", tarfile.SYMTYPE, "../../../etc")],
        "files/link",
        "pointing out of the package",
    ),
    "hard link out": (
        [_member("files/h", tarfile.LNKTYPE, "/etc/passwd")],
        "files/h",
        "outside the package",
    ),
    "member through a symlink": (
        [_member("d", tarfile.SYMTYPE, "/tmp"), _member("d/x")],
        "d/x",
        "beneath the symbolic link d",
    ),
}


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    script = HEAD.encode()
    with tarfile.open(path, "w") as tar:
        tar.addfile(_member("build.toml", data=script)[0], io.BytesIO(script))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("name", list(TAR_CASES))
def test_bad_package_tarball_names_archive_and_member(
    name: str, short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    members, member, says = TAR_CASES[name]
    archive = _tarball(short_tmp / "pkg.tar", members)
    unpack_dir = short_tmp / "tmp"  # where rfs unpacks archives ($TMPDIR)
    unpack_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(unpack_dir))
    code = main(["check", "--script-only", str(archive)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert any(
        str(archive) in line and member in line and says in line for line in err.splitlines()
    ), err
    with pytest.raises(ScriptError):
        load(archive)
    # Nothing was written: not where the members point, not even a temporary directory.
    assert not Path("/etc/evil").exists() and not (short_tmp.parent / "evil").exists()
    assert list(unpack_dir.iterdir()) == []
    assert sorted(p.name for p in short_tmp.iterdir()) == ["pkg.tar", "tmp"]


# -- overlays through symlinks in the image that point outside it ----------------------------


def _export_with_escaping_links() -> bytes:
    """An export whose /etc/up climbs far above the root and whose /etc/root is "/"."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        etc = tarfile.TarInfo("etc")
        etc.type, etc.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(etc)
        for name, target in (("etc/up", "../../../../../../outside"), ("etc/root", "/")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
    return buf.getvalue()


def test_overlay_through_an_image_symlink_pointing_out_stays_in_the_image(short_tmp: Path) -> None:
    """A symlink is resolved inside the image, as the kernel of the booted image would: `..`
    stops at the image's root and `/` is the image's root. Staged on the host (the route of
    erofs, btrfs and vfat), nothing lands outside the staging directory."""
    from rfs.fs.overlay import OverlayEntry
    from rfs.fs.selection import Selection
    from rfs.fs.staging import extract
    from rfs.fs.tarstream import write_image_stream

    overlays = [
        OverlayEntry("/etc/up/x", b"one", 0o644),
        OverlayEntry("/etc/root/etc/passwd", b"two", 0o644),
    ]
    stream = io.BytesIO()
    write_image_stream(
        io.BytesIO(_export_with_escaping_links()), Selection(), overlays, stream, mtime=0
    )
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tar:
        files = {m.name.strip("./"): member_bytes(tar, m) for m in tar.getmembers() if m.isfile()}
        names = [m.name for m in tar.getmembers()]
    assert files == {"outside/x": b"one", "etc/passwd": b"two"}
    assert not any(".." in name.split("/") for name in names)

    stage = short_tmp / "stage"
    stage.mkdir()
    stream.seek(0)
    extract(stream, stage, clamp_mtime=0)
    assert (stage / "outside" / "x").read_bytes() == b"one"
    assert (stage / "etc" / "passwd").read_bytes() == b"two"
    assert sorted(p.name for p in short_tmp.iterdir()) == ["stage"]
    assert not Path("/outside").exists()
