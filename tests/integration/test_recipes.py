"""What recipes need (#14), on the real engine: files copied in before the commands, several
overlays on one destination written through directory symlinks, side outputs, root-owned
squashfs and erofs images, and image-wide defaults for the commands."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.constants import BUSYBOX_TABLE
from tests.fsinspect import list_ext4, read_ext4_file
from tests.fslisting import list_image
from tests.packages import write_package
from tests.rfsrun import rfs, steps_run

DEBIAN = '{ name = "docker.io/library/debian", tag = "bookworm-slim" }'


def write(root: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    """A package of `files` (relative path -> text) under `root`."""
    write_package(root, None, dict(files))
    for name in executable:
        (root / name).chmod(0o755)
    return root


def ext4_text(image: Path, path: str) -> str:
    """The content of file `path` in an ext4 image."""
    return read_ext4_file(image, list_ext4(image)[path].inode).decode()


# --- copy-in ---------------------------------------------------------------------------------

COPY_BUILD = """\
[container]
{engine}image = {image}

[[copy]]
source = "/root-tree"
destination = "/"

[[copy]]
source = "/files/secret.conf"
destination = "/home/app/secret.conf"
uid = 1000
gid = 1001
mode = 0o600

[[copy]]
source = "/files/units"
destination = "/etc/app/units"
mode = 0o640

[[commands]]
script_inline = \"\"\"
set -e
# The copies are there before the first command, writable, with the owners given.
stat -c '%u %g %a' /home/app/secret.conf > /seen-secret
cat /home/app/secret.conf >> /seen-secret
echo "changed by a command" >> /home/app/secret.conf
chown -R 1234:1234 /etc/app
ls /sbin/rfs-tool /usr/sbin/rfs-tool > /seen-tool
\"\"\"
"""


def _copy_package(root: Path, engine_toml: str) -> Path:
    return write(
        root,
        {
            "build.toml": COPY_BUILD.format(engine=engine_toml, image=DEBIAN),
            "root-tree/sbin/rfs-tool": "#!/bin/sh\necho tool\n",
            "root-tree/etc/rfs-tree.conf": "from the tree\n",
            "files/secret.conf": "secret=1\n",
            "files/units/a.service": "[Unit]\n",
        },
        executable=("root-tree/sbin/rfs-tool",),
    )


def test_copies_land_before_the_first_command_with_their_owners(
    tmp_path: Path, engine_toml: str
) -> None:
    pkg = _copy_package(tmp_path / "pkg", engine_toml)
    image, cache = tmp_path / "img.ext4", tmp_path / "cache"
    built = rfs("build", pkg, "-o", image, cache=cache)
    assert built.code == 0, built.err
    tree = list_ext4(image)
    # Written through the merged-/usr symlink: /sbin stays a link and its files stay too.
    assert tree["/sbin"].type == "symlink" and tree["/sbin"].target == "usr/sbin"
    assert "/usr/sbin/nologin" in tree
    assert (tree["/usr/sbin/rfs-tool"].type, tree["/usr/sbin/rfs-tool"].mode) == ("file", 0o755)
    assert ext4_text(image, "/seen-tool") == "/sbin/rfs-tool\n/usr/sbin/rfs-tool\n"
    assert ext4_text(image, "/etc/rfs-tree.conf") == "from the tree\n"
    secret = tree["/home/app/secret.conf"]
    assert (secret.uid, secret.gid, secret.mode) == (1000, 1001, 0o600)
    assert ext4_text(image, "/seen-secret") == "1000 1001 600\nsecret=1\n"
    assert ext4_text(image, "/home/app/secret.conf") == "secret=1\nchanged by a command\n"
    # A tree with `mode`: files get it, directories it plus search; the command's chown stays.
    units = tree["/etc/app/units"]
    assert (units.mode, units.uid) == (0o750, 1234)
    assert (tree["/etc/app/units/a.service"].mode, tree["/etc/app/units/a.service"].uid) == (
        0o640,
        1234,
    )

    # Editing a copied file runs the commands again, and only what follows the base.
    (pkg / "files" / "secret.conf").write_text("secret=2\n")
    plan = rfs("plan", pkg, "-o", image, cache=cache)
    assert plan.code == 0, plan.err
    assert steps_run(plan.out) == {"run[0]", "diff[0]", "assemble"}
    again = rfs("build", pkg, "-o", image, cache=cache)
    assert again.code == 0, again.err
    assert ext4_text(image, "/seen-secret") == "1000 1001 600\nsecret=2\n"
    # An owner of a copy is keyed too.
    text = (pkg / "build.toml").read_text().replace("gid = 1001", "gid = 1002")
    (pkg / "build.toml").write_text(text)
    plan = rfs("plan", pkg, "-o", image, cache=cache)
    assert steps_run(plan.out) == {"run[0]", "diff[0]", "assemble"}


def test_a_copy_of_a_missing_file_names_the_field(tmp_path: Path) -> None:
    pkg = write(tmp_path / "pkg", {"build.toml": COPY_BUILD.format(engine="", image=BUSYBOX_TABLE)})
    checked = rfs("check", "--script-only", pkg, cache=tmp_path / "cache")
    assert checked.code == 2
    assert "copy[0].source" in checked.err and "/root-tree not found" in checked.err


# --- overlays ----------------------------------------------------------------------------------

OVERLAY_BUILD = """\
[filesystem]
type = "{fs}"

[container]
image = {image}

[[commands]]
# busybox as a merged-/usr system: /sbin is a link to usr/sbin.
script_inline = \"\"\"
set -e; mkdir -p /usr/sbin; mv /sbin/* /usr/sbin/; rmdir /sbin; ln -s usr/sbin /sbin
\"\"\"

[[overlays]]
source = "/common"
destination = "/"
is_directory = true

[[overlays]]
source = "/variant"
destination = "/"
is_directory = true

[[overlays]]
source_inline = "last file wins\\n"
destination = "/etc/rfs/which"
"""


@pytest.mark.parametrize("fs", ["Ext4", "Squashfs"])
def test_overlays_on_one_destination_merge_in_order_through_symlinks(
    tmp_path: Path, fs: str
) -> None:
    pkg = write(
        tmp_path / "pkg",
        {
            "build.toml": OVERLAY_BUILD.format(fs=fs, image=BUSYBOX_TABLE),
            "common/etc/rfs/which": "common\n",
            "common/etc/rfs/common-only": "common\n",
            "common/sbin/rfs-init-helper": "#!/bin/sh\n",
            "variant/etc/rfs/variant-only": "variant\n",
            "variant/etc/rfs/shared": "variant\n",
            "common/etc/rfs/shared": "common\n",
        },
        executable=("common/sbin/rfs-init-helper",),
    )
    image = tmp_path / f"img.{fs.lower()}"
    built = rfs("build", pkg, "-o", image, cache=tmp_path / "cache")
    assert built.code == 0, built.err
    tree = list_image(image, fs.lower())
    assert tree["/sbin"].type == "symlink" and tree["/sbin"].target == "usr/sbin"
    assert tree["/usr/sbin/rfs-init-helper"].mode == 0o755
    assert tree["/usr/sbin/ifconfig"].type == "symlink"  # what /sbin had is still there

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    assert tree["/etc/rfs/which"].sha256 == sha("last file wins\n")
    assert tree["/etc/rfs/shared"].sha256 == sha("variant\n")  # the later tree wins
    assert tree["/etc/rfs/common-only"].sha256 == sha("common\n")
    assert tree["/etc/rfs/variant-only"].sha256 == sha("variant\n")


# --- side outputs ------------------------------------------------------------------------------

OUTPUTS_BUILD = """\
[container]
image = {image}

[[commands]]
script_inline = \"\"\"
set -e
mkdir -p /etc/keys
echo public > /etc/keys/host.pub
echo private > /etc/keys/host
chmod 600 /etc/keys/host
ls /bin > /manifest.txt
\"\"\"

[[outputs]]
path = "/manifest.txt"
to = "img.manifest"
remove = true

[[outputs]]
path = "/etc/keys/host.pub"

[[outputs]]
path = "/etc/keys/host"
to = "keys/host"
"""


def test_side_outputs_next_to_the_image_warm_or_clean(tmp_path: Path) -> None:
    pkg = write(tmp_path / "pkg", {"build.toml": OUTPUTS_BUILD.format(image=BUSYBOX_TABLE)})
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    built = rfs("build", pkg, "-o", out / "img.ext4", cache=cache)
    assert built.code == 0, built.err
    manifest = (out / "img.manifest").read_text()
    assert "busybox" in manifest.split()
    assert (out / "host.pub").read_text() == "public\n"
    assert (out / "keys" / "host").read_text() == "private\n"
    assert (out / "keys" / "host").stat().st_mode & 0o777 == 0o600
    tree = list_ext4(out / "img.ext4")
    assert "/manifest.txt" not in tree and "/etc/keys/host.pub" in tree
    assert not [p for p in os.listdir(out) if ".rfs-tmp-" in p]

    # A side output deleted: the image is assembled again from the cached export.
    (out / "host.pub").unlink()
    plan = rfs("plan", pkg, "-o", out / "img.ext4", cache=cache)
    assert steps_run(plan.out) == {"assemble"}, plan.out
    again = rfs("build", pkg, "-o", out / "img.ext4", cache=cache)
    assert again.code == 0, again.err
    assert (out / "host.pub").read_text() == "public\n"
    # Unchanged: nothing runs.
    plan = rfs("plan", pkg, "-o", out / "img.ext4", cache=cache)
    assert not steps_run(plan.out), plan.out
    # A clean build elsewhere gives the same image and the same side outputs.
    clean = tmp_path / "clean"
    clean.mkdir()
    fresh = rfs("build", pkg, "-o", clean / "img.ext4", cache=tmp_path / "cache2")
    assert fresh.code == 0, fresh.err
    for name in ("img.ext4", "img.manifest", "host.pub", "keys/host"):
        assert (clean / name).read_bytes() == (out / name).read_bytes(), name


def test_a_missing_side_output_fails_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    text = OUTPUTS_BUILD.format(image=BUSYBOX_TABLE).replace(
        '"/etc/keys/host.pub"', '"/etc/keys/nothing.pub"'
    )
    pkg = write(tmp_path / "pkg", {"build.toml": text})
    out = tmp_path / "out"
    out.mkdir()
    built = rfs("build", pkg, "-o", out / "img.ext4", cache=tmp_path / "cache")
    assert built.code == 1, built.err
    assert "outputs[1].path: /etc/keys/nothing.pub is not in the image" in built.err
    assert os.listdir(out) == []


# --- all_root ----------------------------------------------------------------------------------

ALL_ROOT_BUILD = """\
[filesystem]
type = "{fs}"
all_root = true

[container]
image = {image}

[[commands]]
script_inline = \"\"\"
set -e
mkdir -p /home/user
echo hi > /home/user/f
ln -s f /home/user/l
chown -R -h 1000:1000 /home/user
\"\"\"

[[overlays]]
source_inline = "mine\\n"
destination = "/home/user/overlaid"
uid = 1000
gid = 1000
mode = 0o600
"""


@pytest.mark.parametrize("fs", ["Squashfs", "Erofs"])
def test_all_root_makes_every_owner_root(tmp_path: Path, fs: str) -> None:
    pkg = write(tmp_path / "pkg", {"build.toml": ALL_ROOT_BUILD.format(fs=fs, image=BUSYBOX_TABLE)})
    image = tmp_path / "img"
    built = rfs("build", pkg, "-o", image, cache=tmp_path / "cache")
    assert built.code == 0, built.err
    tree = list_image(image, fs.lower())
    assert {(n.uid, n.gid) for n in tree.values()} == {(0, 0)}
    assert tree["/home/user/overlaid"].mode == 0o600  # modes stay
    # Without it, the owners are the commands' and overlays'.
    (pkg / "build.toml").write_text(
        ALL_ROOT_BUILD.format(fs=fs, image=BUSYBOX_TABLE).replace("all_root = true\n", "")
    )
    plan = rfs("plan", pkg, "-o", image, cache=tmp_path / "cache")
    assert steps_run(plan.out) == {"assemble"}, plan.out
    built = rfs("build", pkg, "-o", image, cache=tmp_path / "cache")
    assert built.code == 0, built.err
    tree = list_image(image, fs.lower())
    for path in ("/home/user", "/home/user/f", "/home/user/l", "/home/user/overlaid"):
        assert (tree[path].uid, tree[path].gid) == (1000, 1000), path


# --- defaults for commands ---------------------------------------------------------------------

DEFAULTS_BUILD = """\
[container]
{engine}image = {image}
uid = 1000
gid = 1000
working_dir = "/tmp"

[[commands]]
uid = 0
gid = 0
working_dir = "/"
command = "mkdir -m 1777 /out"

[[commands]]
script_inline = "id -u > /out/default-id; id -g >> /out/default-id; pwd > /out/default-pwd"

[[commands]]
working_dir = "/out"
script_inline = "pwd > /out/own-pwd; id -u > /out/own-id"
"""


def test_container_defaults_apply_unless_a_command_overrides(
    tmp_path: Path, engine_toml: str
) -> None:
    pkg = write(
        tmp_path / "pkg",
        {"build.toml": DEFAULTS_BUILD.format(engine=engine_toml, image=BUSYBOX_TABLE)},
    )
    image = tmp_path / "img.ext4"
    built = rfs("build", pkg, "-o", image, cache=tmp_path / "cache")
    assert built.code == 0, built.err
    assert ext4_text(image, "/out/default-id") == "1000\n1000\n"
    assert ext4_text(image, "/out/default-pwd") == "/tmp\n"
    assert ext4_text(image, "/out/own-pwd") == "/out\n"
    assert ext4_text(image, "/out/own-id") == "1000\n"
    assert list_ext4(image)["/out/default-id"].uid == 1000
