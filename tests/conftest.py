"""Fixtures and marker handling shared by every test.

Markers (declared in pyproject.toml):
- `integration`: tests under tests/integration/ get it automatically; they need a running
  engine and skip (with the reason) when none answers. Deselect them with `-m "not integration"`.
- `slow`: skipped unless `--run-slow` is given, RFS_RUN_SLOW=1, or CI is set (CI runs them all:
  the boot test and the Debian example build are the proofs that matter most).

Engine fixtures: `engine_kind` ("docker" or "podman"; parametrised, so every test that uses it,
directly or through `docker_engine`, runs once per engine: RFS_TEST_ENGINES="docker,podman" by
default, or a single RFS_TEST_ENGINE, whose socket RFS_TEST_ENGINE_URI may name), `docker_engine`
(the engine under test, connected once per session and engine), `busybox_image`, `run_label` /
`run_labels` (unique to this test run: put them on every container a test creates), and `tmp_tag`
(image tags under `rfs-test-tmp/<run id>-…`). At the end of the session every container carrying
the run label and every `rfs-test-tmp/<run id>-*` image is removed, if an engine was ever
connected.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.engine import Engine, connect
from rfs.errors import EngineError
from tests.constants import BUSYBOX, RUN_ID, RUN_LABEL_KEY, TMP_REPO_PREFIX

_INTEGRATION_DIR = Path(__file__).parent / "integration"
_connected: list[Engine] = []


def require_or_skip(reason: str) -> None:
    """Skip a test whose environment is missing, except in CI, where that is a failure:
    a CI run that silently skipped the integration suite would prove nothing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}", pytrace=False)
    pytest.skip(reason)


def podman_ready() -> None:
    """Skip (fail in CI) unless Podman answers and holds the busybox test image."""
    from rfs.engine import connect
    from rfs.errors import EngineError

    try:
        engine = connect("podman")
        engine.ping()
        if engine.image_id(BUSYBOX) is None:
            require_or_skip(f"{BUSYBOX} is not in Podman: run scripts/make-base-images.sh")
    except EngineError as exc:
        require_or_skip(f"this case needs Podman: {exc}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (or set RFS_RUN_SLOW=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = (
        config.getoption("--run-slow")
        or os.environ.get("RFS_RUN_SLOW") == "1"
        or bool(os.environ.get("CI"))
    )
    skip_slow = pytest.mark.skip(reason="slow: use --run-slow or RFS_RUN_SLOW=1")
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


_summary_lines: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the "unit coverage" line tests/unit/project/test_unit_coverage.py records."""
    if report.when == "call":
        _summary_lines.extend(str(v) for k, v in report.user_properties if k == "unit coverage")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the unit coverage in every run's summary (CI's log shows it)."""
    for line in _summary_lines:
        terminalreporter.write_line(line)


def engine_kinds() -> list[str]:
    """The engines the integration tests run against, in order."""
    single = os.environ.get("RFS_TEST_ENGINE")
    if single:
        return [single]
    kinds = os.environ.get("RFS_TEST_ENGINES", "docker,podman")
    return [kind.strip() for kind in kinds.split(",") if kind.strip()]


@pytest.fixture(scope="session", params=engine_kinds())
def engine_kind(request: pytest.FixtureRequest) -> str:
    """The engine under test, "docker" or "podman": each test using it runs once per engine."""
    return str(request.param)


@pytest.fixture(scope="session")
def docker_engine(engine_kind: str) -> Engine:
    """The engine under test, connected and answering; skips the test when there is none."""
    uri = (
        (os.environ.get("RFS_TEST_ENGINE_URI") or None)
        if os.environ.get("RFS_TEST_ENGINE")
        else None
    )
    try:
        engine = connect(engine_kind, uri)
        engine.ping()
    except EngineError as exc:
        require_or_skip(f"integration tests need a {engine_kind} engine: {exc}")
    _connected.append(engine)
    return engine


def engine_url(engine: Engine) -> str:
    """The API address of a real engine (`connect` makes a DockerEngine for either kind)."""
    from rfs.engine.docker_engine import DockerEngine  # the docker SDK: only when asked

    assert isinstance(engine, DockerEngine), engine
    return engine.base_url


@pytest.fixture(scope="session")
def busybox_image(docker_engine: Engine) -> str:
    """The local busybox test image (no Cmd, no Entrypoint); skips when it is absent."""
    if docker_engine.image_id(BUSYBOX) is None:
        require_or_skip(f"{BUSYBOX} is not in the engine: run scripts/make-base-images.sh")
    return BUSYBOX


@pytest.fixture(scope="session")
def run_label() -> str:
    """ "org.rfs.test-run=<id>": the label filter selecting this test run's containers."""
    return f"{RUN_LABEL_KEY}={RUN_ID}"


@pytest.fixture(scope="session")
def run_labels() -> dict[str, str]:
    """The run label as a mapping, for RunSpec.labels and export(labels=...)."""
    return {RUN_LABEL_KEY: RUN_ID}


@pytest.fixture
def tmp_tag() -> Callable[[str], str]:
    """Make unique image tags that the session cleanup removes: tmp_tag("layer") → repo:N."""
    counter = itertools.count(1)
    return lambda name: f"{TMP_REPO_PREFIX}{name}:{next(counter)}-{uuid.uuid4().hex[:8]}"


def _tmp_images(engine: Engine) -> list[str]:
    # The Engine protocol has no image listing (rfs never needs one), so ask the API directly.
    import docker

    api: Any = docker.APIClient(base_url=getattr(engine, "base_url", None), version="1.40")
    try:
        found = api.images(filters={"reference": f"{TMP_REPO_PREFIX}*"})
    finally:
        api.close()
    return [tag for image in found for tag in image.get("RepoTags") or []]


def _layer_tags(base: Path) -> set[str]:
    """The `rfs/layer:<key>` tags recorded by every rfs cache the tests made under `base`."""
    from tests.cachefiles import layer_tags

    tags: set[str] = set()
    for index in base.rglob("index"):
        if not (index.is_dir() and (index.parent / "blobs").is_dir()):
            continue
        with contextlib.suppress(Exception):  # a cache a test damaged on purpose
            tags.update(layer_tags(index.parent))
    return tags


def _other_engines(connected: set[str]) -> list[Engine]:
    """The engines at their default sockets, other than `connected`, that answer."""
    found = []
    for kind in ("docker", "podman"):
        if kind in connected:
            continue
        try:
            engine = connect(kind, None)
            engine.ping()
        except EngineError:
            continue
        found.append(engine)
    return found


@pytest.fixture(scope="session", autouse=True)
def _remove_test_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At session end, remove this run's containers, rfs-test-tmp images and the layer images
    of the rfs caches the tests made (a developer's engine would otherwise fill up)."""
    yield
    layers = _layer_tags(tmp_path_factory.getbasetemp())
    engines = list(_connected)
    if layers:  # tests that drive rfs as a subprocess connect no engine of their own
        engines += _other_engines({engine.name for engine in engines})
    for engine in engines:
        engine.remove_containers(f"{RUN_LABEL_KEY}={RUN_ID}")
        # Any order works: untagging a parent keeps it only until its last child goes.
        for tag in [*_tmp_images(engine), *sorted(layers)]:
            try:
                engine.remove_image(tag)
            except EngineError:  # still used (a container of another run): leave it
                continue
