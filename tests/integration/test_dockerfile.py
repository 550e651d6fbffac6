"""`container.dockerfile` and digest-pinned bases on the real engines (Docker, then Podman).

A Dockerfile with ARG, RUN, COPY, ENV and two stages (FROM the local busybox, COPY --from)
builds, and its ENV reaches a later `[[commands]]`; a no-op rebuild sends the engine no build
and no container create (counted by a recording proxy in front of its socket,
`tests/engineproxy.py`: the builder's intermediate containers carry no rfs label); a context
file's edit reaches the image, a `.dockerignore`d file's does not rerun anything; a build arg
change reruns; `--explain` names each change; a failing instruction is named. A base pinned by
digest builds when the digest is the image's, and a wrong one fails naming the field.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.engine import Engine
from tests.cachefiles import layer_tags
from tests.conftest import engine_url
from tests.constants import BUSYBOX, BUSYBOX_NAME
from tests.engineproxy import EngineProxy
from tests.fsinspect import list_ext4, read_ext4_file
from tests.packages import write_package
from tests.rfsrun import Rfs, containers_of, steps_run

pytestmark = pytest.mark.integration

DOCKERFILE = f"""\
ARG BASE={BUSYBOX}
FROM $BASE AS build
ARG FLAVOUR=plain
RUN mkdir -p /made && echo "$FLAVOUR" > /made/flavour
FROM {BUSYBOX}
ENV GREETING=hello-from-dockerfile
COPY app/ /opt/app/
COPY --from=build /made/flavour /etc/flavour
"""


def build_toml(engine_toml: str, proxy: EngineProxy, flavour: str = "salted") -> str:
    return (
        "[filesystem]\nsize_mib = 16\n[container]\n"
        f'{engine_toml}connection_uri = "{proxy.uri}"\n'
        'dockerfile = "/Dockerfile"\n'
        f'build_args = {{ FLAVOUR = "{flavour}" }}\n'
        '[[commands]]\nscript_inline = "#!/bin/sh\\necho \\"$GREETING\\" > /etc/greeting\\n"\n'
    )


@pytest.fixture
def proxy(docker_engine: Engine) -> Iterator[EngineProxy]:
    """A recording proxy on a unix socket in front of the engine under test."""
    upstream = engine_url(docker_engine).removeprefix("unix://")
    where = Path(tempfile.mkdtemp(prefix="rfs-proxy-"))  # short: socket paths are limited
    recorder = EngineProxy(upstream, where / "engine.sock")
    yield recorder
    recorder.close()
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def rfs(tmp_path: Path, engine_client: Any) -> Iterator[Rfs]:
    runner = Rfs(tmp_path / "cache", tmpdir=tmp_path / "tmp", timeout_s=600)
    yield runner
    for run_id in runner.run_ids:  # nothing left behind, whatever happened
        left = containers_of(engine_client, run_id)
        assert left == [], f"containers left behind: {[c.id[:12] for c in left]}"
    # Planning copies the base's context files (rfs.run.snapshot), also for `rfs plan` and
    # when the base's build fails: the copies go with the process's end.
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
    done = runner("cache", "clear")  # the built bases' tags go with the cache
    assert done.code == 0, done.err


def engine_work(proxy: EngineProxy, since: int) -> tuple[int, int]:
    """(builds, container creates) the engine was asked for since request number `since`."""
    asked = [path.split("?")[0] for method, path, _ in proxy.requests()[since:] if method == "POST"]
    builds = sum(1 for p in asked if p.endswith("/build"))
    return builds, sum(1 for p in asked if p.endswith("/containers/create"))


def text(image: Path, path: str) -> str:
    return read_ext4_file(image, list_ext4(image)[path].inode).decode()


def run_layer_tags(cache: Path) -> list[str]:
    """The tags of the command layers a cache recorded (not its Dockerfile bases)."""
    from rfs.run.store import Store

    store = Store(cache)
    try:
        return [str(r["tag"]) for _, r in store.records() if r.get("kind") == "run"]
    finally:
        store.close()


def test_a_dockerfile_base(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str, docker_engine: Engine
) -> None:
    pkg = write_package(
        tmp_path / "pkg",
        build_toml(engine_toml, proxy),
        {
            "Dockerfile": DOCKERFILE,
            "app/main.txt": "main\n",
            "notes.txt": "not for the engine\n",
            ".dockerignore": "notes.txt\n",
        },
    )
    out = tmp_path / "image.ext4"
    first = rfs("build", pkg, "-o", out, "--no-network")
    assert first.code == 0, first.err
    assert text(out, "/etc/greeting") == "hello-from-dockerfile\n"  # ENV reached the command
    assert text(out, "/etc/flavour") == "salted\n"  # the build arg, through COPY --from
    assert text(out, "/opt/app/main.txt") == "main\n"
    assert "/opt/app/notes.txt" not in list_ext4(out)
    assert engine_work(proxy, 0)[0] == 1

    # A no-op: no build, no container.
    seen = len(proxy.requests())
    again = rfs("build", pkg, "-o", out, "--no-network")
    assert again.code == 0, again.err
    assert engine_work(proxy, seen) == (0, 0)

    # An ignored file: nothing runs.
    (pkg / "notes.txt").write_text("edited, still ignored\n")
    plan = rfs("plan", pkg, "-o", out, "--no-network")
    assert plan.code == 0 and not steps_run(plan.out), plan.out
    seen = len(proxy.requests())
    again = rfs("build", pkg, "-o", out, "--no-network")
    assert again.code == 0, again.err
    assert engine_work(proxy, seen) == (0, 0)

    # A context file's edit reaches the image, and --explain names it.
    # (Planning resolves the base, so `plan` builds a missing one, as it loads an archive.)
    (pkg / "app" / "main.txt").write_text("edited\n")
    seen = len(proxy.requests())
    explained = rfs("plan", pkg, "-o", out, "--no-network", "--explain")
    assert "context file app/main.txt changed" in explained.out, explained.out
    edited = rfs("build", pkg, "-o", out, "--no-network")
    assert edited.code == 0, edited.err
    assert text(out, "/opt/app/main.txt") == "edited\n"
    assert engine_work(proxy, seen)[0] == 1

    # A build arg's change reruns, and --explain names it.
    (pkg / "build.toml").write_text(build_toml(engine_toml, proxy, "peppered"))
    explained = rfs("plan", pkg, "-o", out, "--no-network", "--explain")
    assert "container.build_args.FLAVOUR changed (salted → peppered)" in explained.out
    rebuilt = rfs("build", pkg, "-o", out, "--no-network")
    assert rebuilt.code == 0, rebuilt.err
    assert text(out, "/etc/flavour") == "peppered\n"

    # --no-cache builds the base again (planning found it: one build, when executing).
    seen = len(proxy.requests())
    fresh = rfs("build", pkg, "-o", out, "--no-network", "--no-cache")
    assert fresh.code == 0, fresh.err
    assert engine_work(proxy, seen)[0] == 1
    builds = [p for m, p, _ in proxy.requests()[seen:] if m == "POST" and "/build" in p]
    assert "nocache=true" in builds[0].lower() or "nocache=1" in builds[0], builds

    # The built bases belong to the cache: clearing it removes their tags.
    tags = [t for t in layer_tags(rfs.cache) if t not in run_layer_tags(rfs.cache)]
    assert tags and all(docker_engine.image_id(t) is not None for t in tags)
    cleared = rfs("cache", "clear")
    assert cleared.code == 0, cleared.err
    assert all(docker_engine.image_id(t) is None for t in tags)


def test_a_failing_instruction_is_named(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> None:
    broken = DOCKERFILE.replace('echo "$FLAVOUR"', "false &&")
    pkg = write_package(
        tmp_path / "pkg",
        build_toml(engine_toml, proxy),
        {"Dockerfile": broken, "app/main.txt": "main\n"},
    )
    failed = rfs("build", pkg, "-o", tmp_path / "x.ext4", "--no-network")
    assert failed.code == 1, failed.err
    assert "container.dockerfile /Dockerfile" in failed.err, failed.err
    assert "RUN mkdir -p /made && false" in failed.err, failed.err
    assert "Traceback" not in failed.err


def test_a_base_pinned_by_digest(
    rfs: Rfs, tmp_path: Path, engine_toml: str, engine_client: Any
) -> None:
    image_id = engine_client.images.get(BUSYBOX).id
    script = (
        "[filesystem]\nsize_mib = 16\n[container]\n"
        f'{engine_toml}image = {{ name = "{BUSYBOX_NAME}", digest = "{image_id}" }}\n'
        '[[commands]]\ncommand = "touch /etc/pinned"\n'
    )
    pkg = write_package(tmp_path / "pkg", script)
    out = tmp_path / "image.ext4"
    done = rfs("build", pkg, "-o", out, "--no-network")
    assert done.code == 0, done.err
    assert "/etc/pinned" in list_ext4(out)

    wrong = "sha256:" + "0" * 64
    (pkg / "build.toml").write_text(script.replace(image_id, wrong))
    failed = rfs("build", pkg, "-o", out, "--no-network")
    assert failed.code == 3, failed.err
    assert f"container.image.digest: no image {BUSYBOX_NAME}@{wrong}" in failed.err


def test_a_missing_from_image_is_one_clear_error(
    rfs: Rfs, proxy: EngineProxy, tmp_path: Path, engine_toml: str
) -> None:
    missing = "rfs-test-tmp/never-made:1"
    pkg = write_package(
        tmp_path / "pkg",
        build_toml(engine_toml, proxy),
        {"Dockerfile": DOCKERFILE.replace(f"ARG BASE={BUSYBOX}", f"ARG BASE={missing}")},
    )
    seen = len(proxy.requests())
    failed = rfs("build", pkg, "-o", tmp_path / "x.ext4", "--no-network")
    assert failed.code == 3, failed.err
    assert f"container.dockerfile (/Dockerfile): FROM image {missing} is not in" in failed.err
    assert "Traceback" not in failed.err
    assert engine_work(proxy, seen) == (0, 0)
