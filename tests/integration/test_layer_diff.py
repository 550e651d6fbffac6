"""What a command changed, read from the real engine: the overlay directory and `docker save`
give the same normalised tarball, which says exactly what changed (#16)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from rfs.engine import Engine, RunSpec
from rfs.engine.layerdiff import Limit

pytestmark = pytest.mark.integration

BIG = Limit(data_bytes=1 << 30, entries=100_000)

FIRST = """
mkdir -p /d/sub /gone/deep /keep
echo a > /d/a; echo b > /d/sub/b; echo g > /gone/deep/g; echo k > /keep/k
echo old > /keep/changed; echo x > /keep/typechange
"""
SECOND = """
set -e
echo new > /new; echo more >> /keep/changed; rm /etc/passwd; rm -rf /gone
rm -rf /d; mkdir /d; echo c > /d/c
ln /new /keep/new-link; ln -s ../new /keep/sym
mkfifo /keep/fifo; mknod /keep/null c 1 3
chown 1000:1001 /keep/k; chmod 4755 /keep/k
rm /keep/typechange; mkdir /keep/typechange
"""


def _run(engine: Engine, image: str, script: str, labels: dict[str, str], tag: str) -> str:
    # Podman's default capabilities leave out MKNOD, which the device node needs.
    spec = RunSpec(image=image, argv=("sh", "-c", script), labels=labels, cap_add=("MKNOD",))
    return engine.run_and_commit(spec, step="run[0]", tag=tag, on_output=lambda _: None)


def _members(data: bytes) -> dict[str, tuple[Any, ...]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        found: dict[str, tuple[Any, ...]] = {}
        for m in tar.getmembers():
            content = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            found[m.name] = (m.type, m.mode, m.uid, m.gid, content, m.linkname, m.devmajor)
        return found


def test_both_routes_give_the_same_diff_and_it_is_exact(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
) -> None:
    first = _run(docker_engine, busybox_image, FIRST, run_labels, tmp_tag("layer"))
    second = _run(docker_engine, first, SECOND, run_labels, tmp_tag("layer"))
    fast, slow = io.BytesIO(), io.BytesIO()
    assert docker_engine.layer_diff(second, first, fast, BIG)
    adapter: Any = docker_engine  # the two routes of the real adapter, taken one by one
    assert adapter._upper_dir(adapter._inspect_image(second)) is not None
    adapter._from_save(second, len(adapter._inspect_image(second)["RootFS"]["Layers"]), slow, BIG)
    assert fast.getvalue() == slow.getvalue()

    got = _members(fast.getvalue())
    reg, lnk, sym, fifo, chr_, dir_ = b"0", b"1", b"2", b"6", b"3", b"5"
    # The first name in path order holds an inode's content, the later ones link to it.
    assert got["keep/new-link"][0] == reg and got["keep/new-link"][4] == b"new\n"
    assert got["new"][0] == lnk and got["new"][5] == "keep/new-link"
    assert got["keep/changed"][4] == b"old\nmore\n"
    assert got["etc/.wh.passwd"][0] == reg
    assert got[".wh.gone"][0] == reg
    assert "d/.wh..wh..opq" in got and got["d/c"][4] == b"c\n"
    assert "d/a" not in got and "d/sub" not in got
    assert got["keep/sym"][0] == sym and got["keep/sym"][5] == "../new"
    assert got["keep/fifo"][0] == fifo
    assert got["keep/null"][0] == chr_ and got["keep/null"][6] == 1
    assert got["keep/k"][1:4] == (0o4755, 1000, 1001)
    assert got["keep/typechange"][0] == dir_
    assert list(got) == sorted(got, key=lambda name: tuple(name.split("/")))


def test_a_change_over_the_limit_is_reported_not_written(
    docker_engine: Engine,
    busybox_image: str,
    run_labels: dict[str, str],
    tmp_tag: Callable[[str], str],
) -> None:
    first = _run(docker_engine, busybox_image, "true", run_labels, tmp_tag("layer"))
    second = _run(
        docker_engine, first, "head -c 300000 /dev/zero > /big", run_labels, tmp_tag("layer")
    )
    out = io.BytesIO()
    assert not docker_engine.layer_diff(second, first, out, Limit(200_000, 100))
    assert out.getvalue() == b""
    assert docker_engine.layer_diff(second, first, out, Limit(400_000, 100))
    assert _members(out.getvalue())["big"][4] == bytes(300000)
