"""End to end through the `rfs` command on the real Docker engine and the real mke2fs.

Each test builds a small busybox package into an ext4 image, then edits it and checks that
exactly the steps the edit touched ran again: judged by rfs's own report and, independently,
by the containers the engine saw created.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.constants import BUSYBOX
from tests.fsinspect import list_ext4, read_ext4_file
from tests.packages import write_package
from tests.rfsrun import Rfs, besides_overlays, count_created

pytestmark = pytest.mark.integration


BUILD_TOML = """
[filesystem]
size_mib = 32

[container]
image = { name = "IMAGE_NAME", tag = "IMAGE_TAG" }

[[commands]]
script_inline = '''
#!/bin/sh
mkdir -p /srv/data
echo one > /srv/data/one
echo first command ran
'''

[[commands]]
script_path = "/scripts/two.sh"

[[commands]]
command = "touch /srv/data/three"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
mode = 0o640
uid = 1
gid = 2
"""


def content(image: Path, path: str) -> bytes:
    """A regular file's bytes in an ext4 image."""
    return read_ext4_file(image, list_ext4(image)[path].inode)


@dataclass
class Result:
    code: int
    out: str
    err: str
    created: int  # containers the engine created during the run

    def ran(self) -> list[str]:
        """Step ids rfs reports as run, in order."""
        return [
            line.split()[1] for line in self.err.splitlines() if line.strip().startswith("done ")
        ]


class RunRfs(Protocol):
    """The `rfs` fixture: run the command once, counting the containers it made."""

    def __call__(self, *args: str | Path) -> Result: ...


@pytest.fixture
def package(tmp_path: Path, engine_toml: str) -> Path:
    name, tag = BUSYBOX.split(":")
    return write_package(
        tmp_path / "pkg",
        BUILD_TOML.replace("IMAGE_NAME", name)
        .replace("IMAGE_TAG", tag)
        .replace("[container]\n", f"[container]\n{engine_toml}"),
        {"scripts/two.sh": "#!/bin/sh\necho two > /srv/data/two\n", "files/motd": "welcome\n"},
    )


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def rfs(cache_dir: Path, engine_client: object) -> Iterator[RunRfs]:
    runner = Rfs(cache_dir, timeout_s=600)

    def run(*args: str | Path) -> Result:
        start_ns = time.time_ns()
        done = runner(*args)  # its run id labels exactly this run's containers
        created = count_created(engine_client, done.run_id, start_ns)
        return Result(done.code, done.out, done.err, created)

    yield run


def test_build_then_noop_then_edits(
    rfs: RunRfs, package: Path, tmp_path: Path, busybox_v2: str
) -> None:
    run = rfs
    out = tmp_path / "out.ext4"

    first = run("build", package, "-o", out)
    assert first.code == 0, first.err
    # ext4: each command's change is kept (diff[i]), no export of the whole container; the
    # overlays and each diff run beside the commands (-j), so the order varies
    assert sorted(besides_overlays(first)) == sorted(
        ["run[0]", "diff[0]", "run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"]
    )
    assert "run[0] | first command ran" in first.err
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
    tree = list_ext4(out)
    assert content(out, "/srv/data/one") == b"one\n"
    assert content(out, "/srv/data/two") == b"two\n"
    assert "/srv/data/three" in tree
    motd = tree["/etc/motd"]
    assert (motd.mode & 0o7777, motd.uid, motd.gid) == (0o640, 1, 2)
    assert content(out, "/etc/motd") == b"welcome\n"
    assert "/.dockerenv" not in tree and "/.rfs" not in tree
    assert out.stat().st_size == 32 * 1024 * 1024
    assert out.stat().st_blocks * 512 < out.stat().st_size  # sparse
    image_bytes = out.read_bytes()

    # nothing changed: no container, the same bytes, nothing ran
    again = run("build", package, "-o", out)
    assert again.code == 0, again.err
    assert (again.ran(), again.created) == ([], 0)
    assert out.read_bytes() == image_bytes

    # an overlay edit reassembles without starting a container
    (package / "files" / "motd").write_text("edited\n")
    plan = run("plan", package, "-o", out)
    assert "run     overlays" in plan.out and "run     assemble" in plan.out
    assert "run     run[" not in plan.out and "run     diff[" not in plan.out
    edited = run("build", package, "-o", out)
    assert (edited.ran(), edited.created) == (["overlays", "assemble"], 0)
    assert content(out, "/etc/motd") == b"edited\n"
    # ... by writing the overlays into the base image the first build cached, not by mke2fs:
    # into the output itself, which is that base image patched by the first build
    assert "(cached base image + debugfs in place (" in edited.err, edited.err
    subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
    motd = list_ext4(out)["/etc/motd"]
    assert (motd.mode & 0o7777, motd.uid, motd.gid, motd.mtime) == (0o640, 1, 2, 0)

    # editing the second of three commands reuses the first layer: two commands run
    (package / "scripts" / "two.sh").write_text("#!/bin/sh\necho TWO > /srv/data/two\n")
    plan = run("plan", package, "-o", out)
    assert "cached  run[0]" in plan.out and "script changed" in plan.out
    second = run("build", package, "-o", out)
    # diff[1] runs beside run[2] (-j): the order varies
    assert sorted(second.ran()) == ["assemble", "diff[1]", "diff[2]", "run[1]", "run[2]"]
    assert second.created == 2  # the two commands: nothing is exported
    assert content(out, "/srv/data/two") == b"TWO\n"

    # another base image reruns everything
    tag = busybox_v2.split(":")[1]
    toml = package / "build.toml"
    toml.write_text(
        toml.read_text().replace(
            'name = "rfs-test/busybox", tag = "1"', f'name = "rfs-test-tmp/busybox", tag = "{tag}"'
        )
    )
    plan = run("plan", package, "-o", out)
    assert (
        "base changed (image changed from rfs-test/busybox:1 to rfs-test-tmp/busybox:v2" in plan.out
    )
    rebased = run("build", package, "-o", out)
    assert sorted(rebased.ran()) == sorted(
        ["run[0]", "diff[0]", "run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"]
    )
    assert content(out, "/etc/busybox-v2") == b"v2\n"


def test_failing_command_names_step_and_leaves_nothing(
    rfs: RunRfs, package: Path, tmp_path: Path, cache_dir: Path
) -> None:
    toml = package / "build.toml"
    toml.write_text(
        toml.read_text().replace('command = "touch /srv/data/three"', 'command = "ls /no/such/dir"')
    )
    out = tmp_path / "out.ext4"
    result = rfs("build", package, "-o", out)
    assert result.code == 1
    assert "run[2]" in result.err and "exited with code" in result.err
    assert "assemble" not in result.ran()
    assert "Traceback" not in result.err
    assert not out.exists()
    assert list(tmp_path.glob(".out.ext4*")) == []
    assert list((cache_dir / "tmp").iterdir()) == []
    # the layers that succeeded are reused by the next build
    toml.write_text(toml.read_text().replace('command = "ls /no/such/dir"', 'command = "true"'))
    fixed = rfs("build", package, "-o", out)
    assert fixed.code == 0, fixed.err
    assert sorted(besides_overlays(fixed, result)) == ["assemble", "diff[2]", "run[2]"]


def test_bad_script_exits_2_with_path(rfs: RunRfs, package: Path, tmp_path: Path) -> None:
    (package / "build.toml").write_text("[filesystem]\nsize_mib = 'big'\n")
    result = rfs("build", package, "-o", tmp_path / "x.ext4")
    assert result.code == 2
    assert "filesystem.size_mib: must be an integer" in result.err
    assert "Traceback" not in result.err


def test_script_named_directly_is_the_package_of_its_directory(
    rfs: RunRfs, package: Path, tmp_path: Path
) -> None:
    """`rfs <verb> pkg/build.toml` (or a YAML script of any name) resolves script_path, overlay
    sources and volumes from the script's directory, as buildfs's pack does."""
    import tomllib

    import yaml

    run = rfs
    script = package / "build.toml"
    script.write_text(
        script.read_text().replace(
            "[container]\n", '[container]\nvolumes = { "/files" = "/mnt/files" }\n'
        )
        + '\n[[commands]]\ncommand = "cp /mnt/files/motd /srv/from-volume"\n'
    )
    for verb in (["check"], ["plan"], ["graph"]):
        done = run(*verb, script)
        assert done.code == 0, f"{verb}: {done.err}"
        assert "cannot reference package files" not in done.err
    out = tmp_path / "named.ext4"
    built = run("build", script, "-o", out)
    assert built.code == 0, built.err
    assert content(out, "/srv/data/two") == b"two\n"  # script_path from the directory
    assert content(out, "/etc/motd") == b"welcome\n"  # overlay source
    assert content(out, "/srv/from-volume") == b"welcome\n"  # volume
    # the same package as the directory: same archive, and the same steps, all cached
    by_file, by_dir = tmp_path / "by-file.tgz", tmp_path / "by-dir.tgz"
    assert run("pack", script, by_file, "-t", "tar-gz").code == 0
    assert run("pack", package, by_dir, "-t", "tar-gz").code == 0
    assert by_file.read_bytes() == by_dir.read_bytes()
    variant = package / "variant.yaml"
    variant.write_text(yaml.safe_dump(tomllib.loads(script.read_text())))
    again = run("build", variant, "-o", tmp_path / "variant.ext4")
    assert again.code == 0, again.err
    # no container: every command step cached (a new output path is assembled again)
    assert again.created == 0 and again.ran() == ["assemble"], again.err
    assert (tmp_path / "variant.ext4").read_bytes() == out.read_bytes()


def privileged_refusal_seen_by_the_sdk(engine_client: Any) -> str | None:
    """The engine's own answer to a privileged busybox container, asked without rfs."""
    import docker.errors

    api = engine_client.api
    host = api.create_host_config(privileged=True, network_mode="none")
    cid = api.create_container(
        BUSYBOX, command=["true"], entrypoint=[], host_config=host, labels={"org.rfs.managed": "1"}
    )["Id"]
    try:
        api.start(cid)
        api.wait(cid, timeout=30)  # removing it while it exits races in Podman 4.3
        return None
    except docker.errors.APIError as exc:
        return str(exc.explanation)
    finally:
        api.remove_container(cid, force=True)


@pytest.mark.parametrize("field", ["container.rootful", "commands[0].privileged"])
def test_privilege_the_host_refuses_is_exit_3_naming_the_field(
    rfs: RunRfs, package: Path, tmp_path: Path, engine_client: Any, engine_toml: str, field: str
) -> None:
    run = rfs
    name, tag = BUSYBOX.split(":")
    rootful = "rootful = true\n" if field == "container.rootful" else ""
    privileged = "privileged = true\n" if field != "container.rootful" else ""
    (package / "build.toml").write_text(
        f'[container]\n{engine_toml}image = {{ name = "{name}", tag = "{tag}" }}\n{rootful}'
        f"[[commands]]\nscript_inline = 'grep CapEff /proc/self/status > /caps'\n{privileged}"
    )
    refusal = privileged_refusal_seen_by_the_sdk(engine_client)
    checked = run("check", package)
    out = tmp_path / "priv.ext4"
    built = run("build", package, "-o", out)
    if refusal is None:  # this engine starts privileged containers here (Podman on this host)
        assert checked.code == 0, checked.err
        assert built.code == 0, built.err
        caps = int(content(out, "/caps").split()[1], 16)
        assert caps & (1 << 21), "CAP_SYS_ADMIN: the command ran privileged"
    else:  # Docker on this host: runc "unable to apply caps: operation not permitted"
        for done in (checked, built):
            assert done.code == 3, done.err
            errors = [ln for ln in done.err.splitlines() if ln.startswith("rfs: error:")]
            assert len(errors) == 1 and f"{field}: asks for privileged containers" in errors[0]
            reason = errors[0].split("refuses to start one here: ", 1)[1]
            assert reason in refusal, (reason, refusal)  # the host's own words
            assert "Traceback" not in done.err
        assert not out.exists()
