"""Writing test packages: one writer, and the build scripts more than one test module uses."""

from __future__ import annotations

from pathlib import Path

from tests.constants import BUSYBOX, BUSYBOX_IMAGE


def write_package(
    root: Path, build_toml: str | None, files: dict[str, str | bytes] | None = None
) -> Path:
    """A package directory `root`: `build.toml` holding `build_toml` (None: none, e.g. the
    script is one of `files`), and `files` (relative path: text or bytes) beside it, parent
    directories made as needed. Returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    if build_toml is not None:
        (root / "build.toml").write_text(build_toml)
    for name, data in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return root


def build_toml(
    marker: str,
    commands: list[str],
    *,
    size_mib: int = 64,
    overlay: str = "one",
    container: str = "",
) -> str:
    """A busybox build script; `marker` makes its keys (and layer tags) this test's own."""
    cmds = "".join(f"\n[[commands]]\n{c}\n" for c in commands)
    name, tag = BUSYBOX.split(":")
    return (
        f"[filesystem]\nsize_mib = {size_mib}\n\n[container]\n"
        f'image = {{ name = "{name}", tag = "{tag}" }}\nenv = {{ MARKER = "{marker}" }}\n'
        f"{container}\n{cmds}\n"
        f'[[overlays]]\nsource_inline = "{overlay}"\ndestination = "/etc/overlay"\n'
    )


# -- the cache tests' package: three commands and an overlay; MARKER makes its keys unique --

CACHE_BUILD_TOML = f"""
[filesystem]
size_mib = 32

[container]
{BUSYBOX_IMAGE}

[[commands]]
script_inline = '''
#!/bin/sh
mkdir -p /srv/data
echo MARKER > /srv/data/marker
'''

[[commands]]
command = "touch /srv/data/two"

[[commands]]
command = "touch /srv/data/three"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""


# -- the fidelity tree: every kind of metadata a command can create ------------------------

FIDELITY_SCRIPT = r"""
#!/bin/sh
set -e
mkdir -p /fid
cd /fid
echo data > owned && chown 1234:5678 owned
echo x > suid && chmod 4755 suid
mkdir sgid && chmod 2775 sgid
mkdir sticky && chmod 1777 sticky
echo secret > zero && chmod 0000 zero
ln -s owned link
echo hl > hard1 && ln hard1 hard2
mknod chr c 1 3
mknod blk b 7 0
mkfifo fifo
echo bytes > "$(printf 'caf\303\251')"
touch owned-big && chown 4000000000:4000000001 owned-big
echo "127.0.0.1 localhost fidelity" > /etc/hosts
"""

FS_SCHEMA_NAME = {
    "ext4": "Ext4",
    "squashfs": "Squashfs",
    "erofs": "Erofs",
    "btrfs": "Btrfs",
    "xfs": "Xfs",
    "vfat": "Vfat",
}


def fidelity_package(root: Path, image: str, fs_type: str, extra: str = "") -> Path:
    """`root/pkg-<fs_type>`: a package building the fidelity tree as `fs_type` from `image`."""
    name, tag = image.split(":")
    return write_package(
        root / f"pkg-{fs_type}",
        f'[filesystem]\ntype = "{FS_SCHEMA_NAME[fs_type]}"\n{extra}\n'
        f'[container]\nimage = {{ name = "{name}", tag = "{tag}" }}\n'
        f"[[commands]]\nscript_inline = '''{FIDELITY_SCRIPT}'''\n",
    )
