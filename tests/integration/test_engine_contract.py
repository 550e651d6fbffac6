"""The Engine protocol's contract, run against the fake engine and the real ones alike: what
the pipeline's unit tests take from `rfs.engine.fake` must be what Docker and Podman do."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator

import pytest

from rfs.engine import Engine, connect
from rfs.engine.base import RunSpec
from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import EngineError, StepFailed
from tests.conftest import engine_kinds, require_or_skip
from tests.constants import BUSYBOX, RUN_ID, RUN_LABEL_KEY

LABELS = {RUN_LABEL_KEY: RUN_ID}


def busybox_shell(ctx: FakeRun) -> int:
    """The two command forms the contract uses: `sh -c "echo T > P"` and `sh -c "exit N"`."""
    script = ctx.argv[2]
    if script.startswith("exit "):
        ctx.print("failing")
        return int(script.split()[1])
    text, _, path = script.removeprefix("echo ").partition(" > ")
    ctx.write(path, text.encode() + b"\n")
    return 0


@pytest.fixture(params=["fake", *engine_kinds()])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "fake":
        fake = FakeEngine(busybox_shell)
        fake.add_image(BUSYBOX, {"/bin/sh": b"#!fake\n"})
        yield fake
        return
    try:
        real = connect(request.param)
        real.ping()
    except EngineError as exc:
        require_or_skip(f"the contract needs {request.param}: {exc}")
    if real.image_id(BUSYBOX) is None:
        require_or_skip(f"{BUSYBOX} is not in {request.param}: run scripts/make-base-images.sh")
    yield real
    real.remove_containers(f"{RUN_LABEL_KEY}={RUN_ID}")


def _tag() -> str:
    return f"rfs-test-tmp/contract-{uuid.uuid4().hex[:12]}:1"


def _files(engine: Engine, image: str) -> dict[str, bytes]:
    buf = io.BytesIO()
    engine.export(image, buf, labels=LABELS)
    data = buf.getvalue()
    assert data[-1024:] == bytes(1024)  # the end-of-archive marker
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isfile() else None
            if f is not None:
                found["/" + info.name.lstrip("./")] = f.read()
    return found


def _run(engine: Engine, script: str, tag: str, *, keep_failed: bool = False) -> str:
    spec = RunSpec(image=BUSYBOX, argv=("sh", "-c", script), labels=LABELS, network=False)
    return engine.run_and_commit(
        spec, step="run[0]", tag=tag, on_output=lambda b: None, keep_failed=keep_failed
    )


def test_missing_images_and_the_base(engine: Engine) -> None:
    assert engine.image_id("rfs-test/no-such-image:1") is None
    assert not engine.has_tag("rfs-test/no-such-image:1")
    base = engine.resolve_base(*BUSYBOX.split(":"))
    assert base == engine.image_id(BUSYBOX) and base.startswith("sha256:")
    assert engine.image_platform(base) == "linux/amd64"
    assert engine.version()


def test_a_command_commits_what_it_wrote_and_export_streams_it(engine: Engine) -> None:
    tag = _tag()
    try:
        image = _run(engine, "echo hello > /made", tag)
        assert engine.has_tag(tag) and engine.image_id(tag) == image
        assert _files(engine, tag)["/made"] == b"hello\n"
        assert "/made" not in _files(engine, BUSYBOX)
    finally:
        engine.remove_image(tag)
    assert not engine.has_tag(tag)


def test_a_failing_command_raises_and_keeps_its_container_only_when_asked(engine: Engine) -> None:
    with pytest.raises(StepFailed, match="exited with code 3"):
        _run(engine, "exit 3", _tag())
    assert engine.container_labels(f"{RUN_LABEL_KEY}={RUN_ID}") == {}
    with pytest.raises(StepFailed) as failed:
        _run(engine, "exit 4", _tag(), keep_failed=True)
    kept = failed.value.container
    assert kept is not None and kept in engine.container_labels(f"{RUN_LABEL_KEY}={RUN_ID}")
    assert engine.remove_containers(f"{RUN_LABEL_KEY}={RUN_ID}") == 1
    assert engine.container_labels(f"{RUN_LABEL_KEY}={RUN_ID}") == {}


def test_save_and_load_keep_the_image_id(engine: Engine) -> None:
    tag, again = _tag(), _tag()
    try:
        image = _run(engine, "echo saved > /saved", tag)
        buf = io.BytesIO()
        engine.save_image(tag, buf)
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
            assert "manifest.json" in tar.getnames()
        engine.remove_image(tag)
        assert engine.image_id(image) is None or engine.image_id(image) == image
        engine.load_image(io.BytesIO(buf.getvalue()))
        assert engine.image_id(image) is not None
        engine.tag(image, again)
        assert _files(engine, again)["/saved"] == b"saved\n"
    finally:
        engine.remove_image(again)
        engine.remove_image(tag)


def test_a_tag_moves(engine: Engine) -> None:
    tag = _tag()
    try:
        first = _run(engine, "echo one > /one", tag)
        second = _run(engine, "echo two > /two", tag)
        assert first != second and engine.image_id(tag) == second
    finally:
        engine.remove_image(tag)


CONTRACT_DOCKERFILE = f"""\
ARG SRC=wrong.txt
FROM {BUSYBOX} AS first
RUN echo staged > /staged
FROM {BUSYBOX}
ARG SRC
ENV WHO=contract
COPY $SRC /copied
COPY --from=first /staged /from-first
"""


def _context(files: dict[str, str]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
    buf.seek(0)
    return buf


def test_a_dockerfile_builds_with_args_and_stages(engine: Engine) -> None:
    tag = _tag()
    context = _context({"Dockerfile": CONTRACT_DOCKERFILE, "a.txt": "from a\n"})
    try:
        image = engine.build_image(
            context, dockerfile="Dockerfile", tag=tag, step="base", build_args={"SRC": "a.txt"}
        )
        assert engine.image_id(tag) == image and image.startswith("sha256:")
        files = _files(engine, tag)
        assert files["/copied"] == b"from a\n"
        assert files["/from-first"] == b"staged\n"
    finally:
        engine.remove_image(tag)


def test_a_failing_dockerfile_instruction_is_named(engine: Engine) -> None:
    tag = _tag()
    broken = CONTRACT_DOCKERFILE.replace("RUN echo staged > /staged", "RUN exit 3")
    context = _context({"Dockerfile": broken, "a.txt": "from a\n"})
    try:
        with pytest.raises(StepFailed, match="RUN exit 3"):
            engine.build_image(context, dockerfile="Dockerfile", tag=tag, step="base")
        assert engine.image_id(tag) is None
    finally:
        engine.remove_image(tag)
