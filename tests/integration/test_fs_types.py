"""Every filesystem type, end to end: `rfs build --verify` of the fidelity tree, the image's
listing (through a read-only loop mount) against the container's (its export tarball), what each
type cannot hold, computed sizes, and byte-identical rebuilds with a cleared cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.fs.assemble import BIT_IDENTICAL
from rfs.script.model import FsType
from tests.cachefiles import export_blob
from tests.conftest import require_or_skip
from tests.constants import TMP_REPO_PREFIX
from tests.fslisting import Node, comparable, container_listing, list_image
from tests.integration.conftest import CAP_NET_RAW, capped_base
from tests.packages import FS_SCHEMA_NAME, fidelity_package
from tests.rfsrun import Rfs, Run

pytestmark = pytest.mark.integration

TYPES = ["ext4", "squashfs", "erofs", "btrfs", "xfs", "vfat"]


def rfs_build(pkg: Path, out: Path, cache: Path, *args: str) -> Run:
    """`rfs build` without SOURCE_DATE_EPOCH (the images' own seed decides)."""
    runner = Rfs(cache, unset=("SOURCE_DATE_EPOCH",), timeout_s=600)
    return runner("build", pkg, "-o", out, *args)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        require_or_skip("the image listings need a loop mount, so root")
    return tmp_path_factory.mktemp("fs-types")


@pytest.fixture(scope="module")
def caps_base(docker_client: Any) -> Iterator[str]:
    """The busybox base with a file carrying security.capability, in Docker only (the image
    types are what these tests vary; engines are covered elsewhere), under this run's tag."""
    with capped_base(docker_client, f"{TMP_REPO_PREFIX}fs-caps:1") as tag:
        yield tag


@pytest.fixture(scope="module")
def built(workdir: Path, caps_base: str) -> dict[str, tuple[Path, str]]:
    """Each type built once from one cache (the container runs once): image, stderr."""
    results: dict[str, tuple[Path, str]] = {}
    for fs_type in TYPES:
        pkg = fidelity_package(workdir, caps_base, fs_type)
        out = workdir / f"fid.{fs_type}"
        done = rfs_build(pkg, out, workdir / "cache", "--verify")
        assert done.code == 0, f"{fs_type}: {done.err}"
        assert "checker found no problem" in done.err, done.err
        results[fs_type] = (out, done.err)
    return results


@pytest.fixture(scope="module")
def container(built: dict[str, tuple[Path, str]], workdir: Path) -> dict[str, Node]:
    return container_listing(workdir / "cache")


@pytest.mark.parametrize("fs_type", TYPES)
def test_image_lists_like_the_container(
    fs_type: str, built: dict[str, tuple[Path, str]], container: dict[str, Node]
) -> None:
    image, _ = built[fs_type]
    listing = comparable(list_image(image, fs_type), fs_type)
    want = comparable(container, fs_type)
    if fs_type == "vfat":  # mtools stores a name that is not UTF-8 with "_" for bad bytes
        mangled = {re.sub("[\udc80-\udcff]", "_", p) for p in container if "\udcff" in p}
        listing = {p: n for p, n in listing.items() if p not in mangled}
        # FAT names are case-insensitive, and mtools may store a non-ASCII name as a short
        # name whose case it does not keep ("café" comes back "cafÉ"; rfs warns about it).
        listing = {p.casefold(): n for p, n in listing.items()}
        want = {p.casefold(): n for p, n in want.items()}
    missing = sorted(set(want) - set(listing))
    extra = sorted(set(listing) - set(want))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    differ = {p: (want[p], listing[p]) for p in want if want[p] != listing[p]}
    assert not differ, "\n".join(
        f"{p}:\n  want {w}\n  got  {g}" for p, (w, g) in list(differ.items())[:8]
    )


@pytest.mark.parametrize("fs_type", [t for t in TYPES if t != "vfat"])
def test_fidelity_tree_details(fs_type: str, built: dict[str, tuple[Path, str]]) -> None:
    """The points of the fidelity tree spelled out, so a failure reads plainly."""
    image, _ = built[fs_type]
    t = list_image(image, fs_type)
    assert (t["/fid/owned"].uid, t["/fid/owned"].gid) == (1234, 5678)
    assert (t["/fid/owned-big"].uid, t["/fid/owned-big"].gid) == (4000000000, 4000000001)
    assert t["/fid/suid"].mode == 0o4755 and t["/fid/sgid"].mode == 0o2775
    assert t["/fid/sticky"].mode == 0o1777 and t["/fid/zero"].mode == 0
    assert t["/fid/hard2"].links == {"/fid/hard1"}
    assert t["/fid/link"].target == "owned" and t["/fid/fifo"].type == "fifo"
    assert t["/usr/bin/capped"].xattrs.get("security.capability") == CAP_NET_RAW
    want_dev = (0, 0) if fs_type == "btrfs" else (1, 3)
    assert (t["/fid/chr"].type, t["/fid/chr"].rdev) == ("char", want_dev)
    assert t["/etc/hosts"].mode == 0o644 and t["/etc/hostname"].mode == 0o644
    assert t["/etc/hosts"].sha256 == hashlib.sha256(b"127.0.0.1 localhost fidelity\n").hexdigest()
    # Timestamps clamped to SOURCE_DATE_EPOCH (0 by default); mkfs.btrfs stamps its root.
    late = sorted(
        p
        for p, n in t.items()
        if n.mtime != 0
        and not p.startswith("/lost+found")
        and not (fs_type == "btrfs" and p == "/")
    )
    assert not late, late[:10]


def test_types_warn_about_what_they_drop(built: dict[str, tuple[Path, str]]) -> None:
    assert "device(s) lose their numbers" in built["btrfs"][1]
    vfat = built["vfat"][1]
    for what in (
        "symlink(s) left out",
        "device node(s) left out",
        "FIFO(s) left out",
        "hard link(s) stored as separate copies",
        "lose their owner",
        "setuid/setgid/sticky",
        "lose their xattrs",
    ):
        assert what in vfat, what
    for lossless in ("ext4", "squashfs", "erofs", "xfs"):
        assert "warning" not in built[lossless][1], built[lossless][1]


def test_computed_sizes(built: dict[str, tuple[Path, str]]) -> None:
    """No size_mib: writable types get content plus headroom (and their minimum), read-only
    ones their content's size in whole 4 KiB blocks; every file is sparse."""
    sizes = {t: built[t][0].stat().st_size for t in TYPES}
    assert sizes["btrfs"] >= 109 << 20 and sizes["xfs"] >= 300 << 20
    assert 16 << 20 <= sizes["ext4"] <= 64 << 20
    for fs_type in ("squashfs", "erofs"):
        assert sizes[fs_type] % 4096 == 0 and sizes[fs_type] < 8 << 20
    for fs_type in ("ext4", "btrfs", "xfs"):
        assert built[fs_type][0].stat().st_blocks * 512 < sizes[fs_type] // 2, fs_type


def test_too_small_fails_naming_the_size_needed(workdir: Path, caps_base: str) -> None:
    pkg = fidelity_package(workdir / "small", caps_base, "ext4", "size_mib = 2")
    out = workdir / "small.ext4"
    done = rfs_build(pkg, out, workdir / "cache")
    assert done.code == 2, done.err
    assert "2 MiB is too small for this ext4 image: the content needs about" in done.err
    assert "hint: set size_mib to" in done.err
    assert not out.exists() and not list(workdir.glob(".small.ext4*"))
    assert list((workdir / "cache" / "tmp").iterdir()) == []


def test_read_only_types_are_padded_to_size_mib(workdir: Path, caps_base: str) -> None:
    pkg = fidelity_package(workdir / "padded", caps_base, "squashfs", "size_mib = 16")
    out = workdir / "padded.squashfs"
    done = rfs_build(pkg, out, workdir / "cache", "--verify")
    assert done.code == 0, done.err
    assert out.stat().st_size == 16 << 20 and out.stat().st_blocks * 512 < 8 << 20


@pytest.mark.parametrize("fs_type", sorted(t.value for t in BIT_IDENTICAL))
def test_rebuild_with_cleared_cache_is_byte_identical(
    fs_type: str, built: dict[str, tuple[Path, str]], workdir: Path, caps_base: str
) -> None:
    """The container runs again (new mtimes, new layer IDs): the image is the same bytes."""
    first, _ = built[fs_type]
    cache = workdir / f"cache-again-{fs_type}"
    pkg = fidelity_package(workdir / "again", caps_base, fs_type)
    again = workdir / f"again.{fs_type}"
    done = rfs_build(pkg, again, cache)
    shutil.rmtree(cache, ignore_errors=True)
    assert done.code == 0, done.err
    assert sha256(again) == sha256(first)


ROOT_OVERLAY_SCRIPT = """
[filesystem]
type = "{type}"
[container]
image = {{ name = "rfs-test/busybox", tag = "1" }}
[[commands]]
script_inline = "echo built > /etc/built"
[[overlays]]
source = "/root"
destination = "/"
is_directory = true
"""


@pytest.mark.parametrize("fs_type", [t for t in TYPES if t != "vfat"])
def test_directory_overlay_at_root_merges_into_every_type(workdir: Path, fs_type: str) -> None:
    # A recipe's tree laid over / meets the export's /etc and /usr: squashfs used to fail with
    # "tar2sqfs failed (exit 1): etc: File exists".
    pkg = workdir / f"root-overlay-{fs_type}"
    (pkg / "root" / "etc").mkdir(parents=True)
    (pkg / "root" / "usr" / "local" / "bin").mkdir(parents=True)
    (pkg / "root" / "etc" / "motd").write_text("from the overlay\n")
    tool = pkg / "root" / "usr" / "local" / "bin" / "hello"
    tool.write_text("#!/bin/sh\necho hello\n")
    tool.chmod(0o755)
    (pkg / "root").chmod(0o700)  # the host directory's mode must not reach the image root
    (pkg / "build.toml").write_text(ROOT_OVERLAY_SCRIPT.format(type=FS_SCHEMA_NAME[fs_type]))
    out = workdir / f"root-overlay.{fs_type}"
    done = rfs_build(pkg, out, workdir / "cache-root-overlay", "--verify")
    assert done.code == 0, done.err
    nodes = list_image(out, fs_type)
    assert nodes["/"].mode == 0o755 and nodes["/etc"].type == "dir"
    motd = hashlib.sha256(b"from the overlay\n").hexdigest()
    assert nodes["/etc/motd"] == Node("file", 0o644, 0, 0, 17, sha256=motd)
    assert nodes["/usr/local/bin/hello"].mode == 0o755
    assert nodes["/etc/built"].size == 6  # the command's file, from the export
    assert nodes["/etc/passwd"].size > 0 and nodes["/bin/busybox"].size > 0  # the base's


def test_btrfs_and_xfs_are_not_claimed_bit_identical() -> None:
    assert FsType.BTRFS not in BIT_IDENTICAL and FsType.XFS not in BIT_IDENTICAL


def test_unmatched_include_and_dd_args_are_warned(
    built: dict[str, tuple[Path, str]], workdir: Path
) -> None:
    from rfs.fs.assemble import assemble
    from rfs.fs.image import Options
    from rfs.fs.tarstream import Selection

    blob = export_blob(workdir / "cache")
    said: list[str] = []
    selection = Selection(whole=False, include_dirs=("/fid", "/no/such/dir"))
    result = assemble(
        FsType.SQUASHFS,
        blob,
        selection,
        [],
        workdir / "partial.squashfs",
        Options(seed=bytes(32), dd_args=("conv=fsync",)),
        warn=said.append,
    )
    assert said == result.warnings
    assert any("export include /no/such/dir matched nothing" in w for w in said)
    assert any("dd_args ['conv=fsync'] ignored" in w for w in said)
    listing = list_image(workdir / "partial.squashfs", "squashfs")
    assert "/fid/owned" in listing and "/bin" not in listing
