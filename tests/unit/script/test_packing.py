"""Package forms: detection by content, safe unpacking, and pack/unpack round trips."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from rfs.errors import ScriptError, UsageError
from rfs.host.hashing import digest_tree
from rfs.script import archive as archives
from rfs.script import package
from rfs.script.archive import PackageType, detect
from rfs.script.packing import pack, unpack
from tests.rfsrun import Rfs

BUILD = """
[filesystem]
size_mib = 64
[container]
image = { name = "rfs-test/busybox", tag = "1" }
volumes = { "/data" = "/mnt/data" }
[[commands]]
script_path = "/scripts/setup.sh"
[[commands]]
script_path = "/scripts/plain.sh"
[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
[[overlays]]
source = "/files/etc"
destination = "/etc"
is_directory = true
"""


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    """A package with scripts (one executable), an overlay file, an overlay directory holding a
    nested directory and a link out of the package (image content), a volume and a stray file."""
    root = tmp_path / "pkg"
    (root / "scripts").mkdir(parents=True)
    (root / "files" / "etc" / "sub").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "build.toml").write_text(BUILD)
    (root / "scripts" / "setup.sh").write_text("#!/bin/sh\necho setup\n")
    (root / "scripts" / "setup.sh").chmod(0o755)
    (root / "scripts" / "plain.sh").write_text("echo plain\n")
    (root / "files" / "motd").write_text("hello\n")
    (root / "files" / "etc" / "hostname").write_text("vm\n")
    (root / "files" / "etc" / "sub" / "deep.conf").write_text("deep\n")
    (root / "files" / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (root / "data" / "blob").write_bytes(bytes(range(256)))
    (root / "unreferenced.txt").write_text("not packed\n")
    return root


def same_package(a: Path, b: Path) -> None:
    assert (a / "build.toml").read_bytes() == (b / "build.toml").read_bytes()
    for ref in ("scripts", "files", "data"):
        assert digest_tree(a / ref) == digest_tree(b / ref), ref
    assert os.readlink(b / "files" / "etc" / "localtime") == "/usr/share/zoneinfo/UTC"
    assert os.access(b / "scripts" / "setup.sh", os.X_OK)
    assert not os.access(b / "scripts" / "plain.sh", os.X_OK)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


SCRIPT = (member("build.toml"), b'[container]\nimage = { name = "a", tag = "b" }\n')


def test_forms_are_detected_by_content(pkg: Path, tmp_path: Path) -> None:
    assert detect(pkg) is PackageType.DIRECTORY
    assert detect(pkg / "build.toml") is PackageType.BUILD_SCRIPT
    assert detect(make_tar(tmp_path / "pkg.bin", [SCRIPT], gz=True)) is PackageType.TAR_GZ
    assert detect(make_tar(tmp_path / "pkg.data", [SCRIPT])) is PackageType.TAR
    (tmp_path / "fake.tgz").write_text("not an archive")
    with pytest.raises(UsageError, match="named like a tar archive but is not one"):
        detect(tmp_path / "fake.tgz")


@pytest.mark.parametrize("kind", [PackageType.TAR_GZ, PackageType.TAR])
def test_archive_round_trip_holds_only_what_the_script_uses(
    pkg: Path, tmp_path: Path, kind: PackageType
) -> None:
    archive = tmp_path / "out.pkg"
    assert pack(pkg, archive, kind) == 7  # build.toml, 2 scripts, motd, 2 in etc/, blob
    assert detect(archive) is kind
    out = unpack(archive, tmp_path / "unpacked")
    same_package(pkg, out)
    assert not (out / "unreferenced.txt").exists()
    # packing is deterministic: same package, same bytes (also when packed from the archive)
    again = tmp_path / "again.pkg"
    pack(archive, again, kind)
    assert again.read_bytes() == archive.read_bytes()


def test_directory_and_build_script_forms(pkg: Path, tmp_path: Path) -> None:
    tgz = tmp_path / "p.tgz"
    pack(pkg, tgz, PackageType.TAR_GZ)
    as_dir = tmp_path / "as-dir"
    pack(tgz, as_dir, PackageType.DIRECTORY)  # from an archive straight to a directory
    same_package(pkg, as_dir)
    with pytest.raises(ScriptError) as info:
        pack(pkg, tmp_path / "single.toml", PackageType.BUILD_SCRIPT)
    paths = {p.path for p in info.value.problems}
    assert paths == {
        "commands[0].script_path",
        "commands[1].script_path",
        "overlays[0].source",
        "overlays[1].source",
        "container.volumes./data",
    }
    assert not (tmp_path / "single.toml").exists()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "build.toml").write_text(SCRIPT[1].decode() + '[[commands]]\ncommand = "true"\n')
    pack(lone, tmp_path / "single.toml", PackageType.BUILD_SCRIPT)
    assert (tmp_path / "single.toml").read_bytes() == (lone / "build.toml").read_bytes()


def test_pack_refuses_a_destination_inside_the_package(pkg: Path) -> None:
    before = (pkg / "build.toml").read_bytes()
    with pytest.raises(UsageError, match="lies inside the package"):
        pack(pkg, pkg / "build.toml", PackageType.BUILD_SCRIPT)
    with pytest.raises(UsageError, match="lies inside the package"):
        pack(pkg, pkg / "sub" / "p.tar", PackageType.TAR)
    assert (pkg / "build.toml").read_bytes() == before


def test_buildfs_style_and_single_top_directory_archives(tmp_path: Path) -> None:
    # buildfs packs with "./" prefixes; `tar czf pkg.tgz pkg/` puts everything in pkg/
    dotted = make_tar(
        tmp_path / "a.tar", [(member("./build.toml"), SCRIPT[1]), (member("./files/x"), b"x")]
    )
    assert (unpack(dotted, tmp_path / "a") / "files" / "x").read_bytes() == b"x"
    nested = make_tar(
        tmp_path / "b.tgz",
        [(member("pkg/build.toml"), SCRIPT[1]), (member("pkg/files/y"), b"y")],
        gz=True,
    )
    out = unpack(nested, tmp_path / "b")
    assert (out / "build.toml").exists() and (out / "files" / "y").read_bytes() == b"y"
    empty = make_tar(tmp_path / "c.tar", [(member("readme"), b"")])
    with pytest.raises(ScriptError, match="holds no build script"):
        unpack(empty, tmp_path / "c")


def test_every_escaping_member_is_refused_by_name(tmp_path: Path) -> None:
    evil = make_tar(
        tmp_path / "evil.tgz",
        [
            SCRIPT,
            (member("../outside"), b"x"),
            (member("/etc/cron.d/x"), b"x"),
            (member("link", tarfile.SYMTYPE, "/etc"), b""),
            (member("link/passwd"), b"x"),
            (member("up", tarfile.SYMTYPE, "../../etc/shadow"), b""),
            (member("hard", tarfile.LNKTYPE, "/etc/passwd"), b""),
            (member("dev", tarfile.CHRTYPE), b""),
            (member("inside", tarfile.SYMTYPE, "build.toml"), b""),
        ],
        gz=True,
    )
    with pytest.raises(ScriptError) as info:
        unpack(evil, tmp_path / "dest")
    found = {p.path: p.message for p in info.value.problems}
    assert set(found) == {"../outside", "/etc/cron.d/x", "link", "link/passwd", "up", "hard", "dev"}
    assert "'..'" in found["../outside"] and "absolute" in found["/etc/cron.d/x"]
    assert "beneath the symbolic link link" in found["link/passwd"]
    assert "pointing out of the package (to ../../etc/shadow)" in found["up"]
    assert all(p.file == str(evil) for p in info.value.problems)
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.tgz"]  # no partial unpack left


def test_links_out_are_kept_inside_overlay_directories_only(tmp_path: Path) -> None:
    script = (
        member("build.toml"),
        SCRIPT[1] + b'[[overlays]]\nsource = "/etc"\ndestination = "/etc"\nis_directory = true\n',
    )
    ok = make_tar(
        tmp_path / "ok.tar",
        [
            script,
            (member("etc", tarfile.DIRTYPE), b""),
            (member("etc/localtime", tarfile.SYMTYPE, "/usr/x"), b""),
        ],
    )
    assert os.readlink(unpack(ok, tmp_path / "ok") / "etc" / "localtime") == "/usr/x"
    bad = make_tar(tmp_path / "bad.tar", [script, (member("etc", tarfile.SYMTYPE, "/etc"), b"")])
    with pytest.raises(ScriptError, match="pointing out of the package"):
        unpack(bad, tmp_path / "bad")


def test_load_unpacks_to_a_private_directory_removed_at_exit(
    pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (pkg / "build.toml").write_text(BUILD.replace("size_mib = 64", "size_mib = 64\nsise_mib = 1"))
    archive = tmp_path / "p.tgz"
    pack(pkg, archive, PackageType.TAR_GZ)
    loaded = package.load(archive)
    assert loaded.script.origin == archive
    assert [str(w) for w in loaded.warnings] == [
        f"{archive}:build.toml: filesystem.sise_mib: "
        "unknown key, ignored (did you mean 'size_mib'?)"
    ]
    root = loaded.script.package_root
    assert root is not None and (root / "scripts" / "setup.sh").is_file()
    assert package.load(archive).script.package_root == root  # unpacked once per process
    package.cleanup()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_leftovers_of_killed_processes_are_removed(
    pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    orphan = tmp_path / f"rfs-package-{dead}-abc"
    (orphan / "ro").mkdir(parents=True)
    (orphan / "ro" / "f").write_text("x")
    (orphan / "ro").chmod(0o500)
    alive = tmp_path / f"rfs-package-{os.getppid()}-def"
    alive.mkdir()
    archive = tmp_path / "p.tar"
    pack(pkg, archive, PackageType.TAR)
    package.load(archive)
    package.cleanup()
    assert not orphan.exists() and alive.exists()


def test_cli_pack_unpack_and_refusal(pkg: Path, tmp_path: Path) -> None:
    rfs = Rfs(tmp_path / "cache")
    done = rfs("pack", pkg, tmp_path / "p.tar.gz", "--type", "tar-gz")
    assert done.code == 0, done.err
    assert rfs("unpack", tmp_path / "p.tar.gz", tmp_path / "u").code == 0
    same_package(pkg, tmp_path / "u")
    evil = make_tar(tmp_path / "evil.tar", [SCRIPT, (member("../x"), b"x")])
    refused = rfs("unpack", evil, tmp_path / "e")
    assert refused.code == 2 and "../x: leads outside the package" in refused.err
    assert "Traceback" not in refused.err
    checked = rfs("check", "--script-only", evil)
    assert checked.code == 2 and "../x: leads outside the package" in checked.err
    busy = rfs("unpack", tmp_path / "p.tar.gz", tmp_path / "u")
    assert busy.code == 2 and "exists and is not empty" in busy.err


# -- the two extraction routes: Python's `data` filter (>= 3.11.4) and rfs's own writer ------


@pytest.fixture(params=["data-filter", "own-writer"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through each extraction route this interpreter has (3.11.2 lacks the filter)."""
    if request.param == "data-filter":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip("this Python has no tarfile extraction filters (< 3.11.4)")
        monkeypatch.setattr(archives, "_HAS_DATA_FILTER", True)
    else:
        monkeypatch.setattr(archives, "_HAS_DATA_FILTER", False)
    return str(request.param)


def test_both_routes_unpack_the_same_package(pkg: Path, tmp_path: Path, route: str) -> None:
    archive = tmp_path / "p.tgz"
    pack(pkg, archive, PackageType.TAR_GZ)
    same_package(pkg, unpack(archive, tmp_path / "out"))


def test_both_routes_limit_modes_and_drop_owners(tmp_path: Path, route: str) -> None:
    def file(name: str, mode: int) -> tuple[tarfile.TarInfo, bytes]:
        info = member(name)
        info.mode, info.uid, info.gid = mode, 4321, 4321
        return info, b"data"

    archive = make_tar(
        tmp_path / "m.tar",
        [
            SCRIPT,
            file("suid", 0o4755),
            file("shared", 0o666),
            file("ro", 0o400),
            file("grp", 0o640),
            file("odd", 0o011),
        ],
    )
    out = unpack(archive, tmp_path / "out")
    modes = {p.name: p.stat().st_mode & 0o7777 for p in out.iterdir() if p.name != "build.toml"}
    assert modes == {"suid": 0o755, "shared": 0o644, "ro": 0o600, "grp": 0o640, "odd": 0o600}
    assert {p.stat().st_uid for p in out.iterdir()} == {os.getuid()}


def test_both_routes_refuse_a_chain_of_inner_links_leading_out(tmp_path: Path, route: str) -> None:
    # each link alone stays inside the package by its name; followed on the host, e leads out
    chain = make_tar(
        tmp_path / "chain.tar",
        [
            SCRIPT,
            (member("d", tarfile.DIRTYPE), b""),
            (member("d/up", tarfile.SYMTYPE, ".."), b""),
            (member("e", tarfile.SYMTYPE, "d/up/.."), b""),
        ],
    )
    with pytest.raises(ScriptError) as info:
        unpack(chain, tmp_path / "dest")
    assert [p.path for p in info.value.problems] == ["e"]
    assert not (tmp_path / "dest").exists()


def test_own_writer_never_writes_through_a_replaced_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archives, "_HAS_DATA_FILTER", False)
    archive = make_tar(
        tmp_path / "dup.tar",
        [
            SCRIPT,
            (member("x", tarfile.SYMTYPE, "build.toml"), b""),
            (member("x"), b"replacement"),
            (member("h", tarfile.LNKTYPE, "x"), b""),
        ],
    )
    out = unpack(archive, tmp_path / "out")
    assert (out / "build.toml").read_bytes() == SCRIPT[1]
    assert not (out / "x").is_symlink() and (out / "x").read_bytes() == b"replacement"
    assert (out / "h").stat().st_ino == (out / "x").stat().st_ino


def test_script_named_directly_is_the_package_of_its_directory(pkg: Path, tmp_path: Path) -> None:
    from rfs.commands.watch import _watched

    as_file = tmp_path / "by-file.tgz"
    as_dir = tmp_path / "by-dir.tgz"
    assert pack(pkg / "build.toml", as_file, PackageType.TAR_GZ) == 7
    pack(pkg, as_dir, PackageType.TAR_GZ)
    assert as_file.read_bytes() == as_dir.read_bytes()
    loaded = package.load(pkg / "build.toml")
    assert loaded.script.package_root == pkg.resolve()
    # --watch polls the package: the script's directory, not the script alone
    assert _watched(pkg / "build.toml") == pkg.resolve()
    assert _watched(pkg) == pkg and _watched(as_file) == as_file
