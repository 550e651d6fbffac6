"""`container.dockerfile` bases and digest-pinned images on the fake engine: the schema, the
keys (Dockerfile, context after .dockerignore, build args, target), planning (a no-op builds
nothing), `--explain`, and failures. The real engines prove the same in
tests/integration/test_dockerfile.py."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import EnvironmentProblem, ScriptError, StepFailed
from rfs.graph.explain import explain_plan
from rfs.graph.planner import Action
from rfs.host import signals
from rfs.pipeline.build import Options, Planned, execute, prepare, release_snapshots
from rfs.report.reporter import Reporter
from rfs.script.package import load
from tests.fakeshell import shell_of

DOCKERFILE = """\
ARG BASE=fake/base:1
FROM $BASE AS build
ARG FLAVOUR=plain
RUN write /made ${FLAVOUR}
FROM fake/base:1
ENV GREETING=hello
COPY app/ /opt/app/
COPY --from=build /made /etc/made
WORKDIR /opt
"""

BUILD = """\
[filesystem]
size_mib = 8
[container]
dockerfile = "/Dockerfile"
build_args = { FLAVOUR = "salted" }
[[commands]]
command = "write /etc/after 1"
"""


shell = shell_of(fail_code=2, sh_c=True)


class World:
    """A Dockerfile package, a cache and a fake engine holding the base image."""

    def __init__(self, root: Path) -> None:
        self.pkg = root / "pkg"
        (self.pkg / "app").mkdir(parents=True)
        (self.pkg / "build.toml").write_text(BUILD)
        (self.pkg / "Dockerfile").write_text(DOCKERFILE)
        (self.pkg / "app" / "main.txt").write_text("main\n")
        (self.pkg / "notes.txt").write_text("ignored\n")
        (self.pkg / ".dockerignore").write_text("# not for the engine\nnotes.txt\n")
        self.engine = FakeEngine(shell)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
        self.out = root / "out.ext4"
        self.cache = root / "cache"
        self.bases: list[str] = []  # the base image ID of each build

    def plan(self, *, no_cache: bool = False) -> Planned:
        opts = Options(package=self.pkg, output=self.out, cache_dir=self.cache, no_cache=no_cache)
        return prepare(opts, Reporter(), engine_factory=lambda script: self.engine)

    def build(self, *, no_cache: bool = False) -> dict[str, Action]:
        """Build; return what happened to each step."""
        with signals.handled():
            planned = self.plan(no_cache=no_cache)
            self.bases.append(planned.facts.base_id)
            try:
                execute(planned, Reporter())
            finally:
                planned.store.close()
        return {d.step.id: d.action for d in planned.decisions}

    def explain(self) -> dict[str, list[str]]:
        planned = self.plan()
        try:
            return explain_plan(planned.decisions, planned.previous, planned.script)
        finally:
            release_snapshots([planned])
            planned.store.close()

    def cat(self, path: str) -> str:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.out)], capture_output=True, check=True
        )
        return done.stdout.decode()

    def edit(self, name: str, text: str) -> None:
        (self.pkg / name).write_text(text)

    def built(self) -> int:
        return self.engine.calls.count("build")


def ran(actions: dict[str, Action]) -> set[str]:
    return {step for step, action in actions.items() if action is Action.RUN}


def test_a_dockerfile_base_builds_and_a_noop_builds_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert ran(w.build()) == {"run[0]", "diff[0]", "overlays", "assemble"}
    assert w.built() == 1
    tree = w.engine.tree(w.bases[0])
    assert tree["/etc/made"].data == b"salted\n"  # the build arg reached the first stage
    assert tree["/opt/app/main.txt"].data == b"main\n"
    assert "/opt/app/notes.txt" not in tree
    import json

    config = json.loads(w.engine.images[w.bases[0]].config)["config"]
    assert "GREETING=hello" in config["Env"] and config["WorkingDir"] == "/opt"
    calls = len(w.engine.calls)
    assert ran(w.build()) == set()
    assert w.built() == 1 and "run" not in w.engine.calls[calls:]


def test_no_cache_builds_the_base_again(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    counter = {"n": 0}

    def counting(ctx: FakeRun) -> int:  # each RUN makes different bytes, as real ones may
        counter["n"] += 1
        if ctx.argv[:2] == ("/bin/sh", "-c"):
            ctx.write("/made", f"build {counter['n']}\n".encode())
            return 0
        return shell(ctx)

    w.engine.run = counting
    assert ran(w.build(no_cache=True)) == {"run[0]", "diff[0]", "overlays", "assemble"}
    assert w.built() == 2
    assert w.engine.tree(w.bases[0])["/etc/made"].data == b"salted\n"
    assert w.cat("/etc/made") == "build 1\n"  # the image holds what this build made
    assert ran(w.build()) == set() and w.built() == 2


def test_the_context_tar_is_what_was_keyed(tmp_path: Path) -> None:
    from rfs.graph.inputs import digest_refs
    from rfs.script.buildcontext import context_entries, context_refs, write_context

    w = World(tmp_path)
    os.symlink("main.txt", w.pkg / "app" / "link")
    (w.pkg / "app" / "run.sh").write_text("#!/bin/sh\n")
    (w.pkg / "app" / "run.sh").chmod(0o700)
    script = load(w.pkg).script
    entries = context_entries(script)
    names = [e.name for e in entries]
    assert "notes.txt" not in names and ".dockerignore" in names and "Dockerfile" in names
    assert script.package_root is not None
    digests = digest_refs(script.package_root, context_refs(entries))
    root = script.package_root
    buf = io.BytesIO()
    write_context(script, entries, lambda ref: root / ref.lstrip("/"), buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        members = {m.name: m for m in tar}
    assert sorted(members) == sorted(names)
    assert members["app/link"].issym() and members["app/link"].linkname == "main.txt"
    assert members["app/run.sh"].mode == 0o755 and members["app/main.txt"].mode == 0o644
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
    assert set(digests) == {e.ref for e in entries if e.kind == "file"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("app/main.txt", "edited\n"), "base: context file app/main.txt changed"),
        (
            ("build.toml", BUILD.replace('"salted"', '"peppered"')),
            "base: container.build_args.FLAVOUR changed (salted → peppered)",
        ),
        (
            ("Dockerfile", DOCKERFILE.replace("WORKDIR /opt", "WORKDIR /srv")),
            "base: Dockerfile /Dockerfile changed (line 9: `WORKDIR /srv`)",
        ),
        (("app/new.txt", "new\n"), "base: context file app/new.txt added"),
    ],
)
def test_a_keyed_change_builds_again_and_explain_names_it(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    w = World(tmp_path)
    w.build()
    w.edit(*change)
    assert w.explain()["base"] == [expected]
    assert ran(w.build()) == {"run[0]", "diff[0]", "assemble"}
    assert w.built() == 2


def test_an_ignored_file_changes_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    w.edit("notes.txt", "edited, and still ignored\n")
    assert ran(w.build()) == set() and w.built() == 1


def test_the_target_stage_is_keyed_and_built(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build()
    w.edit("build.toml", BUILD.replace("build_args", 'target = "build"\nbuild_args'))
    assert ran(w.build()) == {"run[0]", "diff[0]", "assemble"}
    tree = w.engine.tree(w.bases[-1])
    assert "/made" in tree and "/opt/app/main.txt" not in tree


def test_a_failing_instruction_is_named(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.edit("Dockerfile", DOCKERFILE.replace("RUN write /made ${FLAVOUR}", "RUN fail now"))
    with pytest.raises(StepFailed, match=r"container.dockerfile /Dockerfile.*`RUN fail now`"):
        w.build()
    assert list(w.engine.tags) == ["fake/base:1"]


def _errors(pkg: Path) -> list[str]:
    with pytest.raises(ScriptError) as caught:
        load(pkg)
    return [str(p) for p in caught.value.problems if p.severity == "error"]


@pytest.mark.parametrize(
    ("container", "message"),
    [
        (
            'dockerfile = "/Dockerfile"\nimage = { name = "a", tag = "b" }',
            "container.dockerfile: conflicts with container.image",
        ),
        ('image = { name = "a", tag = "b" }\ntarget = "x"', "container.target: only applies"),
        ('dockerfile = "/Dockerfile"\ncontext = "/app"', "container.dockerfile: /Dockerfile is"),
        ('dockerfile = "/Dockerfile"\ncontext = "/nope"', "container.context: /nope not found"),
        ('dockerfile = "/Dockerfile"\ntarget = "1x"', "container.target: '1x' is not a stage"),
        ('dockerfile = "/missing"', "container.dockerfile: /missing not found"),
        ('dockerfile = "/escape/Dockerfile"', "container.dockerfile: /escape/Dockerfile leads"),
        (
            'image = { name = "a", digest = "sha256:abc" }',
            "container.image.digest: must be",
        ),
        (
            f'image = {{ name = "a", tag = "b", digest = "sha256:{"0" * 64}" }}',
            "container.image.tag: conflicts with image.digest",
        ),
    ],
)
def test_schema_errors_name_the_field(tmp_path: Path, container: str, message: str) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "app").mkdir(parents=True)
    (pkg / "Dockerfile").write_text("FROM fake/base:1\n")
    os.symlink(tmp_path, pkg / "escape")
    (pkg / "build.toml").write_text(f"[container]\n{container}\n")
    assert any(message in e for e in _errors(pkg)), _errors(pkg)


def _pinned(tmp_path: Path, digest: str) -> tuple[FakeEngine, Options]:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    image = f'image = {{ name = "fake/base", digest = "{digest}" }}'
    (pkg / "build.toml").write_text(f"[filesystem]\nsize_mib = 8\n[container]\n{image}\n")
    opts = Options(package=pkg, output=tmp_path / "o.ext4", cache_dir=tmp_path / "c")
    return FakeEngine(shell), opts


def test_a_pinned_image_is_used_by_its_id_and_the_digest_is_keyed(tmp_path: Path) -> None:
    engine, opts = _pinned(tmp_path, "sha256:" + "0" * 64)
    image_id = engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
    opts.package.joinpath("build.toml").write_text(
        opts.package.joinpath("build.toml").read_text().replace("sha256:" + "0" * 64, image_id)
    )
    planned = prepare(opts, Reporter(), engine_factory=lambda script: engine)
    release_snapshots([planned])
    planned.store.close()
    assert planned.facts.base_id == image_id
    base = next(s for s in planned.steps if s.id == "base")
    assert base.inputs["digest"] == image_id


def test_a_wrong_digest_fails_naming_the_field(tmp_path: Path) -> None:
    engine, opts = _pinned(tmp_path, "sha256:" + "1" * 64)
    engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
    with pytest.raises(EnvironmentProblem, match=r"^container.image.digest: no image fake/base@"):
        prepare(opts, Reporter(), engine_factory=lambda script: engine)


def test_a_yaml_script_takes_the_same_fields(tmp_path: Path) -> None:
    w = World(tmp_path)
    (w.pkg / "build.toml").unlink()
    (w.pkg / "build.yaml").write_text(
        "filesystem: {size_mib: 8}\n"
        "container:\n"
        "  dockerfile: /Dockerfile\n"
        "  build_args: {FLAVOUR: salted}\n"
        "  target: build\n"
        "commands:\n"
        "  - command: write /etc/after 1\n"
    )
    c = load(w.pkg).script.container
    assert (c.dockerfile, c.context, c.build_args, c.target) == (
        "/Dockerfile",
        "/",
        (("FLAVOUR", "salted"),),
        "build",
    )
    w.build()
    assert w.engine.tree(w.bases[0])["/made"].data == b"salted\n"


def test_the_failing_instruction_is_found_in_either_engines_words() -> None:
    from rfs.engine.imagebuild import failing_instruction

    docker = ["Step 1/3 : FROM busybox", " ---> abc", "Step 2/3 : RUN make all", "oops"]
    podman = ["STEP 1/3: FROM busybox", "STEP 2/3: RUN make all", "oops"]
    assert failing_instruction(docker) == "RUN make all (step 2/3)"
    assert failing_instruction(podman) == "RUN make all (step 2/3)"
    assert failing_instruction(["no steps here"]) is None


def test_an_unreadable_context_is_a_script_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rfs.script.buildcontext as buildcontext

    def unreadable(script: object) -> list[object]:
        raise PermissionError(13, "Permission denied", str(tmp_path / "pkg" / "app"))

    monkeypatch.setattr(buildcontext, "context_entries", unreadable)
    w = World(tmp_path)
    with pytest.raises(ScriptError, match=r"container.context: cannot read .*/app"):
        w.plan()


def test_a_retagged_from_image_builds_the_base_again_and_explain_names_it(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    first = w.engine.image_id("fake/base:1")
    w.build()
    # The user rebuilds the image the Dockerfile's FROM lines name: same tag, other content.
    other = w.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n", "/etc/v2": b"v2\n"})
    assert other != first
    (line,) = w.explain()["base"]
    assert line.startswith("base: FROM image fake/base:1 is another image now (image_id ")
    assert ran(w.build()) == {"run[0]", "diff[0]", "assemble"}
    assert w.built() == 2
    assert w.engine.tree(w.bases[-1])["/etc/v2"].data == b"v2\n"  # built on the new image
    assert w.cat("/etc/v2") == "v2\n"
    # Back to the first image: its base is still cached under its own key, nothing is built.
    assert first is not None
    w.engine.tag(first, "fake/base:1")
    assert ran(w.build()) <= {"assemble"} and w.built() == 2
    assert w.bases[-1] == w.bases[0] and "/etc/v2" not in w.engine.tree(w.bases[-1])


def test_the_from_images_are_keyed_by_id_and_platform(tmp_path: Path) -> None:
    w = World(tmp_path)
    planned = w.plan()
    release_snapshots([planned])
    planned.store.close()
    base = next(s for s in planned.steps if s.id == "base")
    image_id = w.engine.image_id("fake/base:1")
    assert base.inputs["from"] == {
        "fake/base:1": {"image_id": image_id, "platform": w.engine.image_platform("fake/base:1")}
    }


def test_a_missing_from_image_fails_naming_the_field_and_the_image(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.edit("build.toml", BUILD.replace("build_args = {", 'build_args = { BASE = "fake/gone:2", '))
    with pytest.raises(EnvironmentProblem) as caught:
        w.plan()
    assert caught.value.message == (
        "container.dockerfile (/Dockerfile): FROM image fake/gone:2 is not in the docker engine"
    )
    assert w.built() == 0 and list(w.engine.tags) == ["fake/base:1"]


def test_a_base_is_not_built_from_a_dockerfile_naming_other_images_than_keyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FROM images are read from the Dockerfile as it is when planning, the base is built
    from the build's checked copy: if the two name different images (an edit in between, and
    back), the base is not built under a key that does not say what it is built from."""
    import rfs.run.basefacts
    from rfs.run.snapshot import PackageChanged

    w = World(tmp_path)
    w.engine.add_image("fake/other:1", {"/bin/sh": b"#!fake\n"})
    edited = DOCKERFILE.replace("FROM fake/base:1\n", "FROM fake/other:1\n").encode()
    original = rfs.run.basefacts.from_image_facts

    def read_while_edited(script: Any, text: bytes, *args: Any, **kwargs: Any) -> Any:
        return original(script, edited, *args, **kwargs)

    monkeypatch.setattr(rfs.run.basefacts, "from_image_facts", read_while_edited)
    with pytest.raises(PackageChanged, match="/Dockerfile changed after rfs planned"):
        w.plan()
    assert w.built() == 0
