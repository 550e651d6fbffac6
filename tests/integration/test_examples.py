"""The recipe examples build as written and hold what their recipes promise, file by file:
examples/firecracker-ci (squashfs, all_root, copy-in, side outputs), examples/fc-containerd
(squashfs, trees laid over / in order through the merged-/usr links) and examples/e2b-template
(ext4, command defaults, copies owned by the user). Each fetches packages from the Debian
mirror, as examples/debian does."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from tests.fsinspect import list_ext4, read_ext4_file
from tests.fslisting import list_image
from tests.rfsrun import rfs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# What each example may take on this machine from an empty cache (the limit).
LIMIT_S = 180


def build(name: str, out: Path, cache: Path) -> float:
    """Build examples/`name` into `out`; return the seconds it took."""
    t0 = time.monotonic()
    built = rfs("build", EXAMPLES / name, "-o", out, cache=cache, timeout_s=LIMIT_S + 60)
    seconds = time.monotonic() - t0
    assert built.code == 0, built.err
    assert seconds < LIMIT_S, f"examples/{name} took {seconds:.0f} s"
    return seconds


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_firecracker_ci(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.squashfs"
    build("firecracker-ci", image, tmp_path / "cache")
    tree = list_image(image, "squashfs")
    assert {(n.uid, n.gid) for n in tree.values()} == {(0, 0)}  # all_root
    assert tree["/sbin"].target == "usr/sbin" and tree["/usr/sbin/init"].type == "symlink"
    assert tree["/usr/sbin/sshd"].type == "file"
    wants = "/etc/systemd/system/multi-user.target.wants"
    assert tree[f"{wants}/fcnet.service"].target == "/etc/systemd/system/fcnet.service"
    assert tree[f"{wants}/ssh.service"].target == "/lib/systemd/system/ssh.service"
    assert tree["/usr/local/bin/fcnet-setup.sh"].mode == 0o755
    assert tree["/etc/ssh/sshd_config.d/10-ci.conf"].mode == 0o644
    assert tree["/root/.ssh"].mode == 0o700
    assert tree["/root/.ssh/authorized_keys"].mode == 0o600
    assert not [p for p in tree if p.startswith("/etc/ssh/ssh_host_")]
    # Side outputs: the package list and the private key, both taken out of the image.
    assert "/root/manifest" not in tree and "/root/.ssh/id_ed25519" not in tree
    manifest = (tmp_path / "rootfs.manifest").read_text().splitlines()
    assert any(line.startswith("openssh-server ") for line in manifest)
    key = tmp_path / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    public = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, check=True, text=True
    ).stdout.split()[:2]
    assert tree["/root/.ssh/authorized_keys"].sha256 == tree["/root/.ssh/id_ed25519.pub"].sha256
    authorized = _authorized_key(image)
    assert authorized.split()[:2] == public


def _authorized_key(image: Path) -> str:
    found = subprocess.run(
        ["unsquashfs", "-cat", str(image), "/root/.ssh/authorized_keys"],
        capture_output=True,
        check=True,
        text=True,
    )
    return found.stdout


def test_fc_containerd(tmp_path: Path) -> None:
    image = tmp_path / "fc-rootfs.squashfs"
    build("fc-containerd", image, tmp_path / "cache")
    tree = list_image(image, "squashfs")
    # files-ephemeral/sbin went through /sbin -> usr/sbin; systemd's init is still there.
    assert tree["/sbin"].type == "symlink" and tree["/sbin"].target == "usr/sbin"
    assert tree["/usr/sbin/init"].target == "/lib/systemd/systemd"
    assert tree["/usr/sbin/overlay-init"].mode == 0o755
    assert tree["/usr/local/bin/agent"].mode == 0o755
    unit = "/etc/systemd/system/multi-user.target.wants/firecracker-agent.service"
    assert tree[unit].target == "../firecracker-agent.service"
    assert "/etc/systemd/system/firecracker-agent.service" in tree
    # The later tree wins where both have a file.
    fstab = (EXAMPLES / "fc-containerd" / "files-ephemeral" / "etc" / "fstab").read_bytes()
    assert tree["/etc/fstab"].sha256 == _sha(fstab)
    assert tree["/overlay"].type == "dir"
    assert "/etc/machine-id" not in tree
    assert {(n.uid, n.gid) for p, n in tree.items() if p.startswith("/usr/local")} == {(0, 0)}


def test_e2b_template(tmp_path: Path) -> None:
    image = tmp_path / "e2b.ext4"
    build("e2b-template", image, tmp_path / "cache")
    tree = list_ext4(image)

    def owner(path: str) -> tuple[str, int, int, int]:
        entry = tree[path]
        return entry.type, entry.mode, entry.uid, entry.gid

    assert owner("/home/user") == ("dir", 0o755, 1000, 1000)
    assert owner("/home/user/.bashrc") == ("file", 0o644, 1000, 1000)
    assert owner("/home/user/.config") == ("dir", 0o700, 1000, 1000)  # the user's chmod
    assert owner("/home/user/workspace/hello.py") == ("file", 0o644, 1000, 1000)
    built_as = read_ext4_file(image, tree["/home/user/.config/built-as"].inode).decode()
    assert built_as.startswith("uid=1000(user) gid=1000(user)")
    assert built_as.splitlines()[1] == "/home/user"
    assert owner("/etc/sudoers.d/user") == ("file", 0o440, 0, 0)
    assert owner("/usr/local/bin/envd") == ("file", 0o755, 0, 0)
    wants = "/etc/systemd/system/multi-user.target.wants/envd.service"
    assert tree[wants].type == "symlink"
    assert tree[wants].target == "/etc/systemd/system/envd.service"
    assert tree["/sbin"].target == "usr/sbin" and tree["/usr/sbin/init"].type == "symlink"
    passwd = read_ext4_file(image, tree["/etc/passwd"].inode).decode()
    assert "user:x:1000:1000::/home/user:/bin/bash" in passwd.splitlines()
