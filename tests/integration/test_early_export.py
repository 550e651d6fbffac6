"""The export of a command's container made while the engine commits it (rfs.run.earlyexport)
gives the image the export of the committed image gives, byte for byte, with Docker and with
Podman; a command that changed what Docker's init layer masks in every container (/etc/mtab)
gets no early export from Docker, and the image is the same either way."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from tests.conftest import podman_ready
from tests.constants import BUSYBOX_IMAGE
from tests.packages import write_package
from tests.rfsrun import Rfs

pytestmark = pytest.mark.integration

EARLY = "made while it was committed"
# 40 MiB: more than a chain of layer diffs may hold, so diff[0] is an anchor.
BIG = "mkdir -p /srv; yes 0123456789abcdef | head -c 41943040 > /srv/big"
MTAB = "ln -sf ../proc/self/mounts /etc/mtab"


def _script(engine: str, fs_type: str, commands: list[str]) -> str:
    cmds = "".join(f"\n[[commands]]\nscript_inline = '''\n{c}\n'''\n" for c in commands)
    return (
        f'[filesystem]\ntype = "{fs_type}"\nsize_mib = 128\n\n'
        f'[container]\nengine = "{engine}"\n{BUSYBOX_IMAGE}\n{cmds}'
    )


@pytest.mark.parametrize("engine", ["Docker", "Podman"])
@pytest.mark.parametrize(
    ("fs_type", "commands", "rebuilt", "early"),
    [
        ("Ext4", [BIG, "touch /srv/late"], "diff[0]", {"Docker", "Podman"}),
        # Podman has no init layer: what a command writes there is what its image holds.
        ("Ext4", [f"{BIG}; {MTAB}", "touch /srv/late"], "diff[0]", {"Podman"}),
        ("Squashfs", ["mkdir /srv; touch /srv/first", BIG], "export", {"Docker", "Podman"}),
    ],
    ids=["anchor", "init layer changed", "export step"],
)
def test_the_early_export_makes_the_image_the_images_export_makes(
    tmp_path: Path, engine: str, fs_type: str, commands: list[str], rebuilt: str, early: set[str]
) -> None:
    if engine == "Podman":
        podman_ready()
    pkg = write_package(tmp_path / "pkg", _script(engine, fs_type, commands))
    rfs = Rfs(tmp_path / "cache")
    first, again = tmp_path / "first.img", tmp_path / "again.img"
    cold = rfs("build", pkg, "-o", first, "--log-level", "info")
    assert cold.code == 0, cold.err
    assert (EARLY in cold.err) is (engine in early), cold.err
    # The same layer exported again, now from its committed image.
    built = rfs("build", pkg, "-o", again, "--rebuild", rebuilt, "--log-level", "info")
    assert built.code == 0, built.err
    assert EARLY not in built.err  # run[0] is cached: its container is long gone
    assert filecmp.cmp(first, again, shallow=False), "the early export made another image"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
