"""The schema turns documents into models and reports every problem with its path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rfs.errors import ScriptError
from rfs.script.model import EngineKind, FsType
from rfs.script.package import load
from rfs.script.schema import parse_script

FULL = """
[filesystem]
type = "Ext4"
size_mib = 512
block_size_mib = 4
dd_args = ["status=none"]
mkfs_args = ["-L", "root"]

[container]
engine = "Podman"
image = { name = "debian", tag = "bookworm" }
rootful = true
wait_timeout_s = 5
connection_uri = "unix:///run/podman/podman.sock"
volumes = { "/data" = "/mnt/data" }
env = { A = "1" }
hostname = "vm"
oci_runtime = "runc"
timeout = 600
cap_add = ["NET_ADMIN"]
cap_drop = ["MKNOD"]

[[commands]]
command = "echo hi"
uid = 1
gid = 2
working_dir = "/tmp"
privileged = true
env = { B = "2" }

[[commands]]
script_inline = "echo inline"

[[commands]]
script_path = "/scripts/a.sh"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"

[[overlays]]
source_inline = "nameserver 1.1.1.1"
destination = "/etc/resolv.conf"
mounted = true

[[overlays]]
source = "/files/dir"
destination = "/opt/dir"
is_directory = true

[export.files]
include = ["/etc/passwd"]
create = ["/etc/machine-id"]

[export.directories]
include = ["/usr", "/etc"]
create = ["/proc", "/tmp"]
"""


def parse(text: str) -> object:
    return parse_script(tomllib.loads(text))


def errors_of(text: str) -> list[str]:
    with pytest.raises(ScriptError) as info:
        parse_script(tomllib.loads(text))
    return [f"{p.path}: {p.message}" for p in info.value.problems if p.severity == "error"]


MINIMAL = '[filesystem]\nsize_mib = 64\n[container]\nimage = { name = "a", tag = "b" }\n'


def test_every_buildfs_field_parses() -> None:
    script, warnings = parse_script(tomllib.loads(FULL))
    assert warnings == []
    assert script.filesystem.type is FsType.EXT4
    assert script.filesystem.mkfs_args == ("-L", "root")
    assert script.container.engine is EngineKind.PODMAN
    assert script.container.volumes == (("/data", "/mnt/data"),)
    assert script.container.cap_drop == ("MKNOD",)
    assert script.commands[0].uid == 1 and script.commands[0].privileged
    assert script.commands[2].script_path == "/scripts/a.sh"
    assert script.overlays[1].mounted and script.overlays[2].is_directory
    assert script.export.directories.create == ("/proc", "/tmp")
    assert not script.export.whole


def test_missing_export_means_whole_filesystem() -> None:
    script, _ = parse_script(tomllib.loads(MINIMAL))
    assert script.export.whole


def test_type_is_case_insensitive_and_erofs_exists() -> None:
    script, _ = parse_script(tomllib.loads(MINIMAL.replace("size_mib", 'type = "erofs"\nsize_mib')))
    assert script.filesystem.type is FsType.EROFS


def test_unknown_key_warns_with_closest_known() -> None:
    _, warnings = parse_script(tomllib.loads(MINIMAL.replace("size_mib", "sise_mib = 1\nsize_mib")))
    assert [str(w) for w in warnings] == [
        "build.toml: filesystem.sise_mib: unknown key, ignored (did you mean 'size_mib'?)"
    ]


def test_every_problem_is_reported_with_its_path() -> None:
    found = errors_of("""
[filesystem]
size_mib = 100
block_size_mib = 3
type = "ntfs"
[container]
image = { name = "a" }
[[commands]]
command = "x"
script_inline = "y"
[[commands]]
uid = "root"
[[overlays]]
destination = "/../etc/x"
source_inline = "a"
""")
    assert any(e.startswith("filesystem.block_size_mib: 3 does not divide") for e in found)
    assert any(e.startswith("filesystem.type: unknown value 'ntfs'") for e in found)
    assert "container.image.tag: is required" in found
    assert any(e.startswith("commands[0]: needs exactly one of") for e in found)
    assert any(e.startswith("commands[1]: needs exactly one of") for e in found)
    assert "commands[1].uid: must be an integer, not a string" in found
    assert any(e.startswith("overlays[0].destination:") and "'..'" in e for e in found)


def test_sizes_are_checked() -> None:
    assert errors_of(MINIMAL.replace("64", "0")) == [
        "filesystem.size_mib: must be at least 1, not 0"
    ]
    assert errors_of(MINIMAL.replace("64", "true"))[0].startswith("filesystem.size_mib: must be an")


def test_overlays_may_share_a_destination_but_not_a_mount() -> None:
    """Overlays on one destination merge in order; two bind mounts there cannot both be seen."""
    shared = (
        MINIMAL
        + """
[[overlays]]
source_inline = "a"
destination = "/etc/x"
[[overlays]]
source_inline = "b"
destination = "/etc/x"
"""
    )
    script, _ = parse_script(tomllib.loads(shared))
    assert [o.source_inline for o in script.overlays] == ["a", "b"]
    found = errors_of(shared.replace('"/etc/x"\n', '"/etc/x"\nmounted = true\n'))
    assert found == [
        "overlays[1].mounted: /etc/x is also where overlays[0] is mounted; only one "
        "overlay per destination can be mounted"
    ]


def test_missing_container_is_an_error() -> None:
    assert errors_of("[filesystem]\nsize_mib = 1\n")[0].startswith("container: is required")


def test_package_references_are_checked(tmp_path: Path) -> None:
    (tmp_path / "build.toml").write_text(
        MINIMAL
        + """
[[commands]]
script_path = "/scripts/missing.sh"
[[overlays]]
source = "/../../etc/passwd"
destination = "/x"
"""
    )
    with pytest.raises(ScriptError) as info:
        load(tmp_path)
    messages = [str(p) for p in info.value.problems]
    assert any("commands[0].script_path: /scripts/missing.sh not found" in m for m in messages)
    assert any("overlays[0].source" in m and "'..'" in m for m in messages)


def test_symlink_out_of_package_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evil").symlink_to("/etc/passwd")
    (tmp_path / "build.toml").write_text(
        MINIMAL + '[[overlays]]\nsource = "/evil"\ndestination = "/x"\n'
    )
    with pytest.raises(ScriptError) as info:
        load(tmp_path)
    assert "overlays[0].source: /evil leads outside the package" in str(info.value)


def test_yaml_loads_the_same_schema(tmp_path: Path) -> None:
    (tmp_path / "build.yaml").write_text(
        "filesystem: {size_mib: 64}\ncontainer: {image: {name: a, tag: b}}\n"
        "commands:\n  - command: echo hi\n"
    )
    script = load(tmp_path).script
    assert script.commands[0].command == "echo hi"


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[filesystem\nsize_mib = 1\n")
    with pytest.raises(ScriptError) as info:
        load(bad)
    assert str(bad) in str(info.value) and "line 1" in str(info.value)


def test_archive_is_the_other_form_of_base_image(tmp_path: Path) -> None:
    archive = MINIMAL.replace('image = { name = "a", tag = "b" }', 'archive = "/images/base.tar"')
    script, _ = parse_script(tomllib.loads(archive))
    assert script.container.archive == "/images/base.tar" and script.container.image is None
    assert script.container.base_label == "archive /images/base.tar"
    both = MINIMAL + 'archive = "/base.tar"\n'
    assert errors_of(both)[0].startswith("container.archive: conflicts with container.image")
    neither = MINIMAL.replace('image = { name = "a", tag = "b" }', 'hostname = "x"')
    assert errors_of(neither)[0].startswith("container.image: is required")
    (tmp_path / "build.toml").write_text(archive)
    with pytest.raises(ScriptError) as info:
        load(tmp_path)
    assert "container.archive: /images/base.tar not found in package" in str(info.value)


def test_size_below_the_filesystems_minimum_is_an_error() -> None:
    xfs = MINIMAL.replace("size_mib = 64", 'type = "Xfs"\nsize_mib = 100')
    assert errors_of(xfs) == [
        "filesystem.size_mib: 100 MiB is below the smallest xfs filesystem mkfs can make (300 MiB)"
    ]
    btrfs = MINIMAL.replace("size_mib = 64", 'type = "btrfs"\nsize_mib = 64')
    assert errors_of(btrfs)[0].startswith("filesystem.size_mib: 64 MiB is below the smallest")
    parse_script(tomllib.loads(MINIMAL.replace("64", "1")))  # mke2fs makes 1 MiB


def test_script_inline_without_shebang_and_every_command_form_are_accepted() -> None:
    script, _ = parse_script(
        tomllib.loads(
            MINIMAL
            + """
[[commands]]
script_inline = "echo no shebang"
[[commands]]
command = "echo   split   on   whitespace"
"""
        )
    )
    assert script.commands[0].script_inline == "echo no shebang"
    found = errors_of(MINIMAL + '[[commands]]\nuid = 1\n[[commands]]\ncommand = "  "\n')
    assert found == [
        "commands[0]: needs exactly one of command, script_inline, script_path (found: none)",
        "commands[1].command: is empty",
    ]


def test_minimum_sizes_match_the_drivers() -> None:
    from rfs.fs import btrfs, xfs
    from rfs.script.schema import MIN_SIZE_MIB

    assert MIN_SIZE_MIB == {FsType.BTRFS: btrfs.MIN_MIB, FsType.XFS: xfs.MIN_MIB}
