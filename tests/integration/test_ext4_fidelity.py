"""A real container's filesystem through `docker export`, the filter and mke2fs, checked in the
image with debugfs: owners, special bits, devices, links, capabilities, odd names, overlays."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import EnvironmentProblem, RfsError, ScriptError
from rfs.fs.ext4 import assemble_ext4, mkfs_version, required_size_mib
from rfs.fs.ext4checksums import LARGE_FILE_BYTES
from rfs.fs.tarstream import OverlayEntry, Selection, StreamStats
from tests.conftest import require_or_skip
from tests.constants import BUSYBOX
from tests.fsinspect import Entry, list_ext4, read_ext4_file

pytestmark = pytest.mark.integration

SEED = bytes(range(32))
EPOCH = 1_700_000_000
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
LONG = "/data/" + "deep/" * 25 + "file"
SETUP = f"""
set -e
mkdir -p /data /sgid /private {LONG.rsplit("/", 1)[0]}
echo owned > /data/owned; chown 1234:5678 /data/owned
echo big > /data/bigids; chown 2147483648:4000000000 /data/bigids
echo suid > /data/suid; chmod 4755 /data/suid
echo sgid > /data/sgidfile; chmod 2755 /data/sgidfile
chmod 2775 /sgid
chown 1234:1234 /private; chmod 0700 /private
chmod 1777 /tmp
echo secret > /data/m0; chmod 0000 /data/m0
ln -s ../data/owned /data/sym
ln -s /{"t" * 120} /data/longsym
echo linked > /data/h1; ln /data/h1 /data/h2
echo pair > /data/p1; ln /data/p1 /data/p2
mknod /data/null c 1 3; mknod /data/loop b 7 0; mkfifo /data/fifo
echo cafe > "/data/café"
echo bad > "/data/$(printf 'x\\377y')"
echo deep > {LONG}
echo from-script > /etc/hostname
"""
# What each path must look like in the image: type, mode, uid, gid, and extras.
EXPECTED: dict[str, dict[str, Any]] = {
    "/data/owned": {"type": "file", "mode": 0o644, "uid": 1234, "gid": 5678},
    "/data/bigids": {"type": "file", "uid": 2147483648, "gid": 4000000000},
    "/data/suid": {"type": "file", "mode": 0o4755, "uid": 0, "gid": 0},
    "/data/sgidfile": {"type": "file", "mode": 0o2755},
    "/sgid": {"type": "dir", "mode": 0o2775},
    "/private": {"type": "dir", "mode": 0o700, "uid": 1234, "gid": 1234},
    "/tmp": {"type": "dir", "mode": 0o1777},
    "/data/m0": {"type": "file", "mode": 0o000, "size": 7},
    "/data/sym": {"type": "symlink", "target": "../data/owned"},
    "/data/longsym": {"type": "symlink", "target": "/" + "t" * 120},
    "/data/null": {"type": "char", "major": 1, "minor": 3},
    "/data/loop": {"type": "block", "major": 7, "minor": 0},
    "/data/fifo": {"type": "fifo"},
    "/data/café": {"type": "file", "size": 5},
    "/data/x\udcffy": {"type": "file", "size": 4},
    LONG: {"type": "file", "size": 5},
    "/data/cap": {"type": "file", "mode": 0o755, "xattrs": {"security.capability": CAP_NET_RAW}},
    "/dev/console": {"type": "char", "mode": 0o600, "uid": 0, "gid": 0, "major": 5, "minor": 1},
    "/opt/app/conf": {"type": "file", "mode": 0o640, "uid": 10, "gid": 20, "mtime": EPOCH},
    "/opt/app": {"type": "dir", "mode": 0o755, "uid": 0, "mtime": EPOCH},
}
OVERLAYS = [
    OverlayEntry("/etc/resolv.conf", b"nameserver 192.0.2.53\n", 0o644),
    OverlayEntry("/opt/app/conf", b"key=value\n", 0o640, uid=10, gid=20),
    OverlayEntry("/data/h1", b"replaced\n", 0o644),
]
RESTORE = {"/etc/hostname": b"from-script\n"}


@pytest.fixture(scope="module")
def export_tar(
    docker_client: Any, run_labels: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Run the fixture script in a busybox container, add a capability, export it to a file."""
    try:
        mkfs_version()
    except EnvironmentProblem as exc:
        require_or_skip(f"{exc} ({exc.hint})")
    cap = io.BytesIO()
    with tarfile.open(fileobj=cap, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cap")
        info.size, info.mode = 4, 0o755
        info.pax_headers = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("latin-1")}
        tar.addfile(info, io.BytesIO(b"cap\n"))
    labels = {**run_labels, "org.rfs.test": "ext4-fidelity"}
    container = docker_client.containers.create(
        BUSYBOX, ["/bin/sh", "-c", SETUP], labels=labels, network_mode="none"
    )
    try:
        container.start()
        status = container.wait(timeout=120)["StatusCode"]
        assert status == 0, container.logs().decode(errors="replace")
        container.put_archive("/data", cap.getvalue())
        directory = tmp_path_factory.mktemp("export")
        for name in ("export.tar", "again.tar"):  # the second, to check reproducibility
            with (directory / name).open("wb") as out:
                for chunk in container.export():
                    out.write(chunk)
    finally:
        container.remove(force=True)
    return directory / "export.tar"


def assemble(export: Path, output: Path, **kwargs: Any) -> StreamStats:
    options: dict[str, Any] = {
        "selection": Selection(),
        "overlays": OVERLAYS,
        "size_mib": 64,
        "seed": SEED,
        "source_date_epoch": EPOCH,
        "restore": RESTORE,
    }
    options.update(kwargs)
    selection, overlays = options.pop("selection"), options.pop("overlays")
    return assemble_ext4(export, selection, overlays, output, **options)


@pytest.fixture(scope="module")
def image(export_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("image") / "rootfs.ext4"
    assemble(export_tar, output)
    return output


@pytest.fixture(scope="module")
def tree(image: Path) -> dict[str, Entry]:
    return list_ext4(image)


def test_export_carries_the_capability(export_tar: Path) -> None:
    with tarfile.open(export_tar) as tar:
        member = tar.getmember("data/cap")
    value = member.pax_headers["SCHILY.xattr.security.capability"]
    assert value.encode("utf-8", "surrogateescape") == CAP_NET_RAW


def test_image_is_clean_sparse_and_exactly_sized(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    st = image.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 16 << 20  # no written zeros
    assert not list(image.parent.glob(".*rfs-tmp*"))


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_metadata_survives(tree: dict[str, Entry], path: str) -> None:
    assert path in tree, f"{path} missing from the image"
    entry = tree[path]
    for field, want in EXPECTED[path].items():
        assert getattr(entry, field) == want, f"{path}: {field}"


def test_hard_links_share_an_inode(tree: dict[str, Entry], image: Path) -> None:
    p1, p2 = tree["/data/p1"], tree["/data/p2"]
    assert p1.inode == p2.inode and p1.links == 2
    assert read_ext4_file(image, p2.inode) == b"pair\n"  # not the empty file mke2fs would make


def test_overlay_over_a_link_target_leaves_the_other_name_alone(
    tree: dict[str, Entry], image: Path
) -> None:
    h1, h2 = tree["/data/h1"], tree["/data/h2"]
    assert h1.inode != h2.inode
    assert read_ext4_file(image, h1.inode) == b"replaced\n"
    assert read_ext4_file(image, h2.inode) == b"linked\n"


def test_docker_artifacts_are_fixed(tree: dict[str, Entry], image: Path) -> None:
    assert "/.dockerenv" not in tree
    assert read_ext4_file(image, tree["/etc/hostname"].inode) == b"from-script\n"
    assert read_ext4_file(image, tree["/etc/resolv.conf"].inode) == b"nameserver 192.0.2.53\n"
    assert tree["/etc/hosts"].size == 0  # Docker emptied it and nothing restored it


def test_same_inputs_give_the_same_bytes(export_tar: Path, image: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.ext4"
    assemble(export_tar.with_name("again.tar"), again)  # a separate export of the container
    assert _sha256(again) == _sha256(image)
    other = tmp_path / "other.ext4"
    assemble(export_tar, other, seed=bytes(32))
    assert _sha256(other) != _sha256(image)


def test_uuid_and_hash_seed_come_from_the_seed(export_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "seeded.ext4"
    assemble(export_tar, output, mkfs_args=["-E", "lazy_itable_init=1", "-L", "rootfs"])
    header = subprocess.run(["dumpe2fs", "-h", str(output)], capture_output=True, check=True)
    fields = dict(line.split(":", 1) for line in header.stdout.decode().splitlines() if ":" in line)
    assert fields["Filesystem UUID"].strip() == str(uuid.UUID(bytes=SEED[:16], version=4))
    assert fields["Directory Hash Seed"].strip() == str(uuid.UUID(bytes=SEED[16:], version=4))
    assert fields["Filesystem volume name"].strip() == "rootfs"
    assert "orphan_file" not in fields["Filesystem features"]


def _header(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, check=True).stdout
    return {
        k.strip(): v.strip()
        for k, v in (ln.split(":", 1) for ln in out.decode().splitlines() if ":" in ln)
    }


def test_checksums_added_after_mke2fs_are_the_ones_it_makes(
    export_tar: Path, image: Path, tmp_path: Path
) -> None:
    # As for content with a large file: mke2fs without checksums, tune2fs and e2fsck after.
    # The same features, checksum seed and tree as mke2fs's own (the seed was 0 when tune2fs
    # set both features at once); e2fsck may rebuild (and so index) a full directory.
    added = tmp_path / "added.ext4"
    assemble(export_tar, added, largest_file=LARGE_FILE_BYTES + 1)
    check = subprocess.run(["e2fsck", "-fn", str(added)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout.decode()
    got, made = _header(added), _header(image)
    for field in ("Filesystem features", "Checksum type", "Checksum seed", "Filesystem UUID"):
        assert got[field] == made[field], field
    assert "metadata_csum" in got["Filesystem features"].split()

    def listing(path: Path) -> dict[str, tuple[object, ...]]:
        return {
            p: (e.type, e.mode, e.uid, e.gid, e.mtime, None if e.type == "dir" else e.size)
            for p, e in list_ext4(path).items()
        }

    assert listing(added) == listing(image)
    tree = list_ext4(added)
    assert read_ext4_file(added, tree["/data/p2"].inode) == b"pair\n"
    again = tmp_path / "again.ext4"
    assemble(export_tar.with_name("again.tar"), again, largest_file=LARGE_FILE_BYTES + 1)
    assert _sha256(again) == _sha256(added)


def test_selection_keeps_includes_and_parents(export_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "partial.ext4"
    selection = Selection(
        whole=False,
        include_files=("/data/owned", "/data/p2"),
        include_dirs=("/bin",),
        create_dirs=("/proc", "/tmp"),
    )
    stats = assemble(export_tar, output, selection=selection, overlays=[])
    tree = list_ext4(output)
    assert sorted(p for p in tree if not p.startswith(("/bin/", "/lost+found"))) == [
        "/",
        "/bin",
        "/data",
        "/data/owned",
        "/data/p2",
        "/proc",
        "/tmp",
    ]
    assert read_ext4_file(output, tree["/data/p2"].inode) == b"pair\n"  # its target was left out
    assert stats.links_materialised == 1
    assert tree["/tmp"].mode == 0o1777
    assert tree["/bin/sh"].type == "symlink" and (tree["/bin/sh"].target or "").endswith("busybox")


def test_later_entry_for_a_path_replaces_the_earlier(tmp_path: Path) -> None:
    export = tmp_path / "dup.tar"
    with tarfile.open(export, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in (
            ("a", b"first", tarfile.REGTYPE),
            ("b", b"", tarfile.LNKTYPE),
            ("a", b"second", tarfile.REGTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = (
                kind,
                len(data),
                "a" if kind == tarfile.LNKTYPE else "",
            )
            tar.addfile(info, io.BytesIO(data))
    output = tmp_path / "dup.ext4"
    assemble(export, output, overlays=[], restore=None, size_mib=8)
    tree = list_ext4(output)
    assert read_ext4_file(output, tree["/a"].inode) == b"second"
    assert read_ext4_file(output, tree["/b"].inode) == b"first"


def test_too_small_says_how_much_is_needed(export_tar: Path, tmp_path: Path) -> None:
    output = tmp_path / "small.ext4"
    output.write_bytes(b"previous image")
    with pytest.raises(ScriptError, match=r"2 MiB is too small .* needs about \d+ MiB") as caught:
        assemble(export_tar, output, size_mib=2)
    assert caught.value.hint and "size_mib" in caught.value.hint
    assert output.read_bytes() == b"previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["small.ext4"]


def test_estimated_size_is_enough(export_tar: Path, tmp_path: Path) -> None:
    stats = assemble(export_tar, tmp_path / "probe.ext4")
    need = required_size_mib(stats)
    assemble(export_tar, tmp_path / "fits.ext4", size_mib=need)


def test_bad_mkfs_arguments_fail_cleanly(export_tar: Path, tmp_path: Path) -> None:
    with pytest.raises(RfsError, match="mke2fs failed"):
        assemble(export_tar, tmp_path / "bad.ext4", mkfs_args=["-O", "no_such_feature"])
    assert list(tmp_path.iterdir()) == []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _no_leftover_containers(docker_client: Any) -> Iterator[None]:
    yield
    leftovers = docker_client.containers.list(
        all=True, filters={"label": "org.rfs.test=ext4-fidelity"}
    )
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers
