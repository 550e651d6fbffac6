"""An arm64 package builds on an amd64 host, on Docker and Podman: its base is the local
arm64 busybox (scripts/make-base-images.sh), its commands run under QEMU's user emulation
(scripts/setup-host.sh registers it with binfmt_misc), a command records `uname -m` = aarch64
in the image, and the image's binaries are aarch64 ELF files (their headers read from the
image with debugfs). amd64 and arm64 builds of one package share no step: planning one after
the other finds nothing cached. A base of another platform than the one asked for is refused.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.engine import Engine
from rfs.host.emulation import cannot_run, host_architecture
from tests.conftest import engine_url, require_or_skip
from tests.constants import BUSYBOX, BUSYBOX_ARM64
from tests.engineproxy import EngineProxy
from tests.fsinspect import list_ext4, read_ext4_file
from tests.packages import write_package
from tests.rfsrun import Rfs, containers_of, steps_run

pytestmark = pytest.mark.integration

EM_AARCH64 = 183  # the ELF e_machine of aarch64
RECORD = "#!/bin/sh\\nuname -m > /etc/arch\\n"
ARM64_VARIANT = {"variant": "v8"}


def build_toml(engine_toml: str, image: str, platform: str | None) -> str:
    name, tag = image.rsplit(":", 1)
    field = f'platform = "{platform}"\n' if platform else ""
    return (
        f"[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}"
        f'image = {{ name = "{name}", tag = "{tag}" }}\n{field}'
        f'[[commands]]\nscript_inline = "{RECORD}"\n'
    )


@pytest.fixture
def rfs(tmp_path: Path, engine_client: Any) -> Any:
    if host_architecture() != "amd64":
        pytest.skip("written for an amd64 host")
    why = cannot_run("arm64")
    if why is not None:
        require_or_skip(f"{why}: run scripts/setup-host.sh")
    try:
        engine_client.images.get(BUSYBOX_ARM64)
    except Exception:
        require_or_skip(f"{BUSYBOX_ARM64} is missing: run scripts/make-base-images.sh")
    runner = Rfs(tmp_path / "cache", timeout_s=600)
    yield runner
    for run_id in runner.run_ids:
        left = containers_of(engine_client, run_id)
        assert left == [], f"containers left behind: {[c.id[:12] for c in left]}"
    done = runner("cache", "clear")
    assert done.code == 0, done.err


@pytest.fixture
def proxy(docker_engine: Engine) -> Iterator[EngineProxy]:
    """A recording proxy on a unix socket in front of the engine under test."""
    upstream = engine_url(docker_engine).removeprefix("unix://")
    where = Path(tempfile.mkdtemp(prefix="rfs-proxy-"))  # short: socket paths are limited
    recorder = EngineProxy(upstream, where / "engine.sock")
    yield recorder
    recorder.close()
    shutil.rmtree(where, ignore_errors=True)


def plan_keys(plan_out: str) -> dict[str, str]:
    """Step id -> the short key an `rfs plan` listing shows."""
    return {
        line.split()[1]: line.split()[2]
        for line in plan_out.splitlines()
        if line.split()[:1] and line.split()[0] in ("run", "cached", "skip")
    }


def elf_machine(image: Path, path: str) -> int:
    """The e_machine of the ELF file at `path` in the ext4 image (following one symlink)."""
    entries = list_ext4(image)
    entry = entries[path]
    if entry.target:
        entry = entries[entry.target]
    header = read_ext4_file(image, entry.inode)[:20]
    assert header[:4] == b"\x7fELF", f"{path} is no ELF file"
    return int.from_bytes(header[18:20], "little")


def test_an_arm64_package_builds_on_this_amd64_host(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> None:
    pkg = write_package(tmp_path / "pkg", build_toml(engine_toml, BUSYBOX_ARM64, "linux/arm64"))
    out = tmp_path / "arm64.ext4"
    checked = rfs("check", pkg)
    assert checked.code == 0, checked.err
    through = write_package(
        tmp_path / "through-proxy",
        build_toml(engine_toml + f'connection_uri = "{proxy.uri}"\n', BUSYBOX_ARM64, "linux/arm64"),
    )
    built = rfs("build", through, "-o", out)
    assert built.code == 0, built.err
    creates = [p for m, p, _ in proxy.requests() if m == "POST" and "/containers/create" in p]
    # The command's container is created for the platform, and so is the export's (never
    # started, created from the last layer).
    assert sum("platform=linux%2Farm64" in p for p in creates) == 2, creates
    assert len(creates) == 2, creates
    built = rfs("build", pkg, "-o", out)
    assert built.code == 0, built.err
    arch = read_ext4_file(out, list_ext4(out)["/etc/arch"].inode)
    assert arch == b"aarch64\n"
    assert elf_machine(out, "/bin/busybox") == EM_AARCH64
    assert elf_machine(out, "/bin/sh") == EM_AARCH64

    arm_plan = rfs("plan", pkg, "-o", out)
    assert arm_plan.code == 0 and not steps_run(arm_plan.out), arm_plan.out

    # The same package for amd64 (--platform wins; its base is the amd64 busybox), planned
    # with the arm64 build's cache: every step runs (the base is the engine's image), and no
    # step has a key of the arm64 build.
    amd = write_package(tmp_path / "amd", build_toml(engine_toml, BUSYBOX, "linux/arm64"))
    amd_out = tmp_path / "amd64.ext4"
    planned = rfs("plan", amd, "-o", amd_out, "--platform", "linux/amd64")
    assert planned.code == 0, planned.err
    assert steps_run(planned.out) == {"run[0]", "diff[0]", "overlays", "assemble"}, planned.out
    assert set(plan_keys(planned.out).values()).isdisjoint(plan_keys(arm_plan.out).values())
    amd_built = rfs("build", amd, "-o", amd_out, "--platform", "linux/amd64")
    assert amd_built.code == 0, amd_built.err
    assert read_ext4_file(amd_out, list_ext4(amd_out)["/etc/arch"].inode) == b"x86_64\n"
    # And the other way round: the arm64 build's steps are all still its own.
    again = rfs("plan", pkg, "-o", out)
    assert again.code == 0 and not steps_run(again.out), again.out


def test_a_base_of_another_platform_is_refused(rfs: Rfs, tmp_path: Path, engine_toml: str) -> None:
    pkg = write_package(tmp_path / "pkg", build_toml(engine_toml, BUSYBOX, "linux/arm64"))
    failed = rfs("build", pkg, "-o", tmp_path / "x.ext4")
    assert failed.code == 3, failed.err
    assert (
        f"container.platform: the base image {BUSYBOX} is linux/amd64, not linux/arm64"
        in failed.err
    ), failed.err
    assert "Traceback" not in failed.err
    checked = rfs("check", pkg)
    assert checked.code == 3, checked.err
    assert f"container.platform: the base image {BUSYBOX} is linux/amd64, not" in checked.err


def test_an_arm64_dockerfile_base_is_built_for_arm64(
    rfs: Rfs, tmp_path: Path, engine_toml: str
) -> None:
    script = (
        f"[filesystem]\nsize_mib = 16\n[container]\n{engine_toml}"
        'dockerfile = "/Dockerfile"\nplatform = "linux/arm64"\n'
        f'[[commands]]\nscript_inline = "{RECORD}"\n'
    )
    dockerfile = f"FROM {BUSYBOX_ARM64}\nRUN uname -m > /etc/built-on\n"
    pkg = write_package(tmp_path / "pkg", script, {"Dockerfile": dockerfile})
    out = tmp_path / "df.ext4"
    built = rfs("build", pkg, "-o", out)
    assert built.code == 0, built.err
    entries = list_ext4(out)
    assert read_ext4_file(out, entries["/etc/built-on"].inode) == b"aarch64\n"  # RUN
    assert read_ext4_file(out, entries["/etc/arch"].inode) == b"aarch64\n"  # [[commands]]


MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def test_pull_fetches_the_platforms_image_of_a_multi_platform_tag(
    tmp_path: Path, docker_client: Any
) -> None:
    """`rfs build --pull` on Docker asks for the build's platform: a tag of a local registry
    that names an amd64 and an arm64 image (a manifest list, as Docker Hub's are) gives the
    arm64 one. Without the platform, Docker pulls the host's (amd64) and the build is refused
    as of another platform. (Podman's compat API takes the same `platform` parameter; it pulls
    from no registry over plain HTTP unless registries.conf says it may, so it is not run
    here.)"""
    import requests

    from tests.cacheservers import ServerMissing, start_registry

    if host_architecture() != "amd64":
        pytest.skip("written for an amd64 host")
    if cannot_run("arm64") is not None:
        require_or_skip("no arm64 emulation: run scripts/setup-host.sh")
    try:
        registry = start_registry()
    except ServerMissing as exc:
        require_or_skip(str(exc))
    name = "rfs-platform-pull"
    repo = f"127.0.0.1:{registry.port}/{name}"
    base_url = f"http://127.0.0.1:{registry.port}/v2/{name}/manifests"
    runner = Rfs(tmp_path / "cache", timeout_s=600)
    try:
        entries = []
        for source, tag, arch in [(BUSYBOX, "amd64", {}), (BUSYBOX_ARM64, "arm64", ARM64_VARIANT)]:
            docker_client.images.get(source).tag(repo, tag)
            for line in docker_client.api.push(repo, tag, stream=True, decode=True):
                assert "error" not in line, line
            docker_client.images.remove(f"{repo}:{tag}")
            got = requests.get(f"{base_url}/{tag}", headers={"Accept": MANIFEST}, timeout=30)
            got.raise_for_status()
            platform = {"os": "linux", "architecture": tag, **arch}
            digest = got.headers["Docker-Content-Digest"]
            entries.append(
                {
                    "mediaType": MANIFEST,
                    "digest": digest,
                    "size": len(got.content),
                    "platform": platform,
                }
            )
        body = {"schemaVersion": 2, "mediaType": MANIFEST_LIST, "manifests": entries}
        put = requests.put(
            f"{base_url}/multi", json=body, headers={"Content-Type": MANIFEST_LIST}, timeout=30
        )
        put.raise_for_status()
        pkg = write_package(
            tmp_path / "pkg", build_toml('engine = "Docker"\n', f"{repo}:multi", "linux/arm64")
        )
        out = tmp_path / "pulled.ext4"
        built = runner("build", pkg, "-o", out, "--pull")
        assert built.code == 0, built.err
        assert read_ext4_file(out, list_ext4(out)["/etc/arch"].inode) == b"aarch64\n"
        assert elf_machine(out, "/bin/busybox") == EM_AARCH64
    finally:
        for tag in ("amd64", "arm64", "multi"):
            with contextlib.suppress(Exception):
                docker_client.images.remove(f"{repo}:{tag}", force=True)
        registry.stop()
        runner("cache", "clear")
