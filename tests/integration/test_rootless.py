"""`rfs build` as a user without root (a throwaway user in the `docker` group, so it can reach
the engine socket) makes ext4, squashfs, erofs and btrfs images holding the container's owners,
modes, devices and capabilities; xfs is refused with the reason. The test itself runs as root:
it creates and removes the user, and inspects the images through read-only loop mounts."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.constants import RUN_ID, TMP_REPO_PREFIX
from tests.fslisting import comparable, container_listing, list_image
from tests.integration.conftest import CAP_NET_RAW, capped_base
from tests.packages import fidelity_package

pytestmark = pytest.mark.integration

USER = f"rfs-nr-{RUN_ID}"[:31]
ROOTLESS_TYPES = ["ext4", "squashfs", "erofs", "btrfs"]


def _as_user(user: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    pairs = [f"{k}={v}" for k, v in env.items()]
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", "-i", *pairs, *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def _blocked_dirs(user: str, paths: list[Path]) -> list[Path]:
    """Directories on the way to `paths` that `user` cannot enter (e.g. /root, where pyenv
    keeps the interpreter)."""
    blocked: list[Path] = []
    for path in paths:
        for directory in [*reversed(path.parents)]:
            probe = subprocess.run(
                ["runuser", "-u", user, "--", "test", "-x", str(directory)],
                capture_output=True,
                check=False,
            )
            if probe.returncode != 0 and directory not in blocked:
                blocked.append(directory)
    return blocked


@pytest.fixture(scope="module")
def user() -> Iterator[tuple[str, Path]]:
    """A non-root user in the docker group with its own working directory; removed after,
    and every directory mode changed to let it reach Python is put back."""
    if os.geteuid() != 0:
        require_or_skip("creating a throwaway user needs root")
    try:
        grp.getgrnam("docker")
    except KeyError:
        require_or_skip("no docker group: the engine socket is not shared with a group")
    work = Path(tempfile.mkdtemp(prefix="rfs-rootless-"))
    subprocess.run(
        [
            "useradd",
            "--no-create-home",
            "--home-dir",
            str(work),
            "--groups",
            "docker",
            "--shell",
            "/bin/sh",
            USER,
        ],
        check=True,
        capture_output=True,
    )
    changed: list[tuple[Path, int]] = []
    try:
        uid = pwd.getpwnam(USER).pw_uid
        os.chown(work, uid, -1)
        work.chmod(0o700)
        import rfs

        needed = [Path(os.path.realpath(sys.executable)), Path(rfs.__file__).resolve()]
        for directory in _blocked_dirs(USER, needed):
            mode = stat.S_IMODE(directory.stat().st_mode)
            changed.append((directory, mode))
            directory.chmod(mode | 0o001)  # search only: nothing becomes listable or readable
        yield USER, work
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)
        subprocess.run(["userdel", USER], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def caps_base(docker_client: Any) -> Iterator[str]:
    with capped_base(docker_client, f"{TMP_REPO_PREFIX}rootless-caps:1") as tag:
        yield tag


@pytest.fixture(scope="module")
def built(user: tuple[str, Path], caps_base: str) -> dict[str, tuple[Path, str]]:
    name, work = user
    env = {
        "HOME": str(work),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "RFS_CACHE_DIR": str(work / "cache"),
        "LC_ALL": "C.UTF-8",
    }
    results: dict[str, tuple[Path, str]] = {}
    for fs_type in [*ROOTLESS_TYPES, "xfs"]:
        pkg = fidelity_package(work, caps_base, fs_type)
        uid = pwd.getpwnam(name).pw_uid
        for path in [pkg, *pkg.iterdir()]:
            os.chown(path, uid, -1)
        out = work / f"rootless.{fs_type}"
        done = _as_user(
            name, [sys.executable, "-m", "rfs", "build", str(pkg), "-o", str(out), "--verify"], env
        )
        results[fs_type] = (out, f"exit {done.returncode}\n{done.stderr}")
    return results


@pytest.mark.parametrize("fs_type", ROOTLESS_TYPES)
def test_non_root_build_keeps_owners_and_modes(
    fs_type: str, built: dict[str, tuple[Path, str]], user: tuple[str, Path]
) -> None:
    image, log = built[fs_type]
    assert log.startswith("exit 0"), log
    assert image.stat().st_uid == pwd.getpwnam(user[0]).pw_uid  # really built by the user
    listing = comparable(list_image(image, fs_type), fs_type)
    want = comparable(container_listing(user[1] / "cache"), fs_type)
    assert set(listing) == set(want)
    differ = {p: (want[p], listing[p]) for p in want if want[p] != listing[p]}
    assert not differ, "\n".join(
        f"{p}:\n  want {w}\n  got  {g}" for p, (w, g) in list(differ.items())[:8]
    )
    t = list_image(image, fs_type)
    assert (t["/fid/owned-big"].uid, t["/fid/owned-big"].gid) == (4000000000, 4000000001)
    assert t["/fid/suid"].mode == 0o4755 and t["/fid/zero"].mode == 0
    assert t["/usr/bin/capped"].xattrs.get("security.capability") == CAP_NET_RAW


def test_xfs_says_it_needs_root(built: dict[str, tuple[Path, str]]) -> None:
    image, log = built["xfs"]
    assert log.startswith("exit 3"), log
    assert "xfs images need root" in log and "ext4, btrfs, erofs or squashfs" in log
    assert not image.exists()
