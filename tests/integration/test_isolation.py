"""What a build script can reach: only the inside of its container, read-only views of its own
package, no engine socket, and with `--no-network` no network.

The build containers are inspected on the real engine while a command runs (found by the run id
rfs is given through RFS_RUN_ID), and the scripts themselves probe their surroundings.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.packages import build_toml, write_package
from tests.rfsrun import IsolatedRfs

pytestmark = pytest.mark.integration

PROBE = r"""#!/bin/sh
set -e
echo started
# The engine's socket is nowhere a tool would look for it.
for s in /var/run/docker.sock /run/docker.sock /run/podman/podman.sock \
         /run/containerd/containerd.sock; do
    if [ -e "$s" ]; then echo "found $s"; exit 1; fi
done
# The package is there, read-only.
cat /mnt/data/readme
if touch /mnt/data/new 2>/dev/null; then echo "the package is writable"; exit 1; fi
# A write to a path that exists on the host lands in the container only.
echo inside > /tmp/HOSTMARK
sleep 2
"""


def tree_digest(root: Path) -> str:
    """Names, kinds and contents of everything under `root`."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def rfs(tmp_path: Path, api: Any) -> IsolatedRfs:
    return IsolatedRfs(tmp_path, api)


def test_build_container_sees_only_its_package_and_no_engine_socket(
    rfs: IsolatedRfs, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    host_mark = Path("/tmp") / f"rfs-isolation-{marker}"
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "readme").write_text("package data\n")
    (pkg / "probe.sh").write_text(PROBE.replace("HOSTMARK", host_mark.name))
    write_package(
        pkg,
        build_toml(
            marker, ['script_path = "/probe.sh"'], container='volumes = { "/data" = "/mnt/data" }'
        ),
    )
    before = tree_digest(pkg)
    out = tmp_path / "image.ext4"

    running = rfs.start("build", pkg, "-o", out, "--no-network")
    running.wait_for(lambda err: "run[0] | started" in err)
    (container,) = rfs.containers(running.run_id)
    info = rfs.api.inspect_container(container["Id"])
    result = running.finish()
    assert result.code == 0, result.err
    assert "run[0] | package data" in result.err

    host = info["HostConfig"]
    assert not host["Privileged"] and not host.get("Devices") and not host.get("CapAdd")
    assert host["NetworkMode"] == "none"
    sources = [Path(m["Source"]) for m in info["Mounts"]]
    scratch = rfs.tmpdir  # rfs's own per-step directory (the script, the /etc files)
    for source in sources:
        assert source.is_relative_to(pkg) or source.is_relative_to(scratch), sources
        assert not source.name.endswith(".sock"), sources
    # the volume is the build's own snapshot of the package directory, read-only
    (data,) = [m for m in info["Mounts"] if m["Destination"] == "/mnt/data"]
    assert Path(data["Source"]).is_relative_to(scratch) and data["RW"] is False

    assert not host_mark.exists()  # the write stayed in the container (and its image)
    assert tree_digest(pkg) == before  # the package is as it was
    rfs.assert_clean(result, out, (out.stat().st_ino, out.stat().st_size, out.stat().st_mtime_ns))


def test_no_network_means_no_network(rfs: IsolatedRfs, tmp_path: Path) -> None:
    """With --no-network a command has only the loopback interface; without it the same
    command finds a network (so this test could tell the difference)."""
    marker = uuid.uuid4().hex
    probe = 'script_inline = "ls /sys/class/net; test \\"$(ls /sys/class/net)\\" = lo"'
    pkg = write_package(tmp_path / "pkg", build_toml(marker, [probe]))
    offline = rfs.run("build", pkg, "-o", tmp_path / "a.ext4", "--no-network")
    assert offline.code == 0, offline.err
    assert "run[0] | lo" in offline.err

    other = IsolatedRfs(tmp_path / "networked", rfs.api)  # its own cache: nothing to reuse
    online = other.run("build", pkg, "-o", tmp_path / "b.ext4")
    assert online.code == 1, online.err
    assert "run[0] | eth0" in online.err
