"""The layered export of ext4 builds (rfs.run.layerchain, #16) on the fake engine, through the
whole pipeline: a late edit runs only the last command, its diff and the assembly, never an
export of the container; a change that would make the chain too big becomes an anchor (the
export of that command's layer) and later changes chain on it; whatever the cache's history,
the image is a clean build's."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from rfs.engine.base import RunSpec
from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import EngineError
from rfs.graph.planner import Action
from rfs.host import signals
from rfs.pipeline.build import Options, execute, prepare
from rfs.report.reporter import Reporter
from rfs.run import layerchain
from rfs.run.earlyexport import EarlyExports
from rfs.run.store import Store
from tests.fakeshell import shell_of

HEAD = """\
[filesystem]
size_mib = 8
[container]
image = { name = "fake/base", tag = "1" }
"""
write = shell_of()


def shell(ctx: FakeRun) -> int:
    """`write PATH TEXT` as usual, `fill PATH N`: N bytes of a pattern at PATH, and
    `many DIR N`: N small files in DIR."""
    if ctx.argv[0] == "many":
        for i in range(int(ctx.argv[2])):
            ctx.write(f"{ctx.argv[1]}/f{i}", b"x")
        return 0
    if ctx.argv[0] == "fill":
        size = int(ctx.argv[2])
        ctx.write(ctx.argv[1], (b"0123456789abcdef" * (size // 16 + 1))[:size])
        return 0
    return write(ctx)


def commands(*argvs: str) -> str:
    return HEAD + "".join(f'[[commands]]\ncommand = "{argv}"\n' for argv in argvs)


class Build:
    """A package, a cache and a fake engine that records which images it exports."""

    def __init__(self, root: Path, text: str) -> None:
        self.pkg = root / "pkg"
        self.pkg.mkdir(parents=True)
        (self.pkg / "build.toml").write_text(text)
        self.engine = FakeEngine(shell)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n", "/etc/hostname": b"x\n"})
        self.out = root / "out.ext4"
        self.cache = root / "cache"
        self.exported: list[str] = []
        real = self.engine.export

        def export(image: str, dest: Any, **kw: Any) -> None:
            self.exported.append(image)
            real(image, dest, **kw)

        self.engine.export = export  # type: ignore[method-assign]
        self.keys: dict[str, str] = {}

    def build(self, text: str | None = None) -> set[str]:
        """Build (after writing `text` as the script); return the steps that ran."""
        if text is not None:
            (self.pkg / "build.toml").write_text(text)
        opts = Options(package=self.pkg, output=self.out, cache_dir=self.cache)
        with signals.handled():
            planned = prepare(opts, Reporter(), engine_factory=lambda script: self.engine)
            try:
                execute(planned, Reporter())
            finally:
                planned.store.close()
        self.keys = {s.id: s.key for s in planned.steps}
        return {d.step.id for d in planned.decisions if d.action is Action.RUN}

    def records(self) -> dict[str, dict[str, Any]]:
        """The local records of this build's steps, by step id."""
        store = Store(self.cache)
        try:
            found = {sid: store.record(key) for sid, key in self.keys.items()}
        finally:
            store.close()
        return {sid: r for sid, r in found.items() if r is not None}

    def cat(self, path: str) -> bytes:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.out)], capture_output=True, check=True
        )
        return done.stdout


def clean_image(root: Path, text: str) -> bytes:
    clean = Build(root, text)
    clean.build()
    return clean.out.read_bytes()


def chains(records: Mapping[str, dict[str, Any]]) -> dict[str, tuple[bool, Any, list[str]]]:
    """Per diff step: whether it is an anchor, its chain's anchor and diffs."""
    return {
        sid: (r["anchor"], r["chain"]["anchor"], r["chain"]["diffs"])
        for sid, r in records.items()
        if sid.startswith("diff[")
    }


FOUR = ("write /etc/one 1", "write /etc/two 2", "write /etc/three 3", "write /etc/four 4")


def test_a_late_edit_runs_only_the_last_command_its_diff_and_the_assembly(
    tmp_path: Path,
) -> None:
    b = Build(tmp_path / "warm", commands(*FOUR))
    b.build()
    # the chain starts at the base image's export (its ID names it), all small diffs
    base_id = b.engine._resolve("fake/base:1")
    assert b.exported == [base_id]
    k = b.keys
    assert chains(b.records()) == {
        "diff[0]": (False, "base", [k["diff[0]"]]),
        "diff[1]": (False, "base", [k["diff[0]"], k["diff[1]"]]),
        "diff[2]": (False, "base", [k["diff[0]"], k["diff[1]"], k["diff[2]"]]),
        "diff[3]": (False, "base", [k["diff[0]"], k["diff[1]"], k["diff[2]"], k["diff[3]"]]),
    }
    calls = len(b.engine.calls)

    edited = commands(*FOUR[:3], "write /etc/four 44")
    assert b.build(edited) == {"run[3]", "diff[3]", "assemble"}
    warm = b.engine.calls[calls:]
    assert warm.count("run") == 1 and warm.count("layer_diff") == 1
    assert "export" not in warm and b.exported == [base_id]
    assert b.cat("/etc/four") == b"44\n" and b.cat("/etc/one") == b"1\n"
    assert b.out.read_bytes() == clean_image(tmp_path / "clean", edited)


def test_a_deleted_file_and_an_edit_in_the_middle_give_a_clean_builds_image(
    tmp_path: Path,
) -> None:
    """A later command that replaces what an earlier one wrote: the diffs are laid in order,
    whichever of them the cache already held."""
    first = commands("write /etc/one 1", "write /etc/two 2", "write /etc/one 111")
    b = Build(tmp_path / "warm", first)
    b.build()
    assert b.cat("/etc/one") == b"111\n"
    edited = commands("write /etc/one 1", "write /etc/two 22", "write /etc/one 111")
    assert b.build(edited) == {"run[1]", "diff[1]", "run[2]", "diff[2]", "assemble"}
    assert b.out.read_bytes() == clean_image(tmp_path / "clean", edited)
    assert b.cat("/etc/two") == b"22\n" and b.cat("/etc/one") == b"111\n"


@pytest.fixture
def small_chain(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chains of at most 3000 data bytes (32 MiB in rfs): big changes cost little here."""
    monkeypatch.setattr(layerchain, "CHAIN_DATA_BYTES", 3000)
    return 3000


def test_a_big_change_is_an_anchor_and_later_small_changes_chain_on_it(
    tmp_path: Path, small_chain: int
) -> None:
    text = commands("write /etc/one 1", "fill /data/big 5000", *FOUR[2:])
    b = Build(tmp_path / "warm", text)
    b.build()
    k = b.keys
    # the big change does not fit the chain: diff[1] is the export of run[1]'s layer image
    assert chains(b.records()) == {
        "diff[0]": (False, "base", [k["diff[0]"]]),
        "diff[1]": (True, k["diff[1]"], []),
        "diff[2]": (False, k["diff[1]"], [k["diff[2]"]]),
        "diff[3]": (False, k["diff[1]"], [k["diff[2]"], k["diff[3]"]]),
    }
    base_id = b.engine._resolve("fake/base:1")
    # diff[1]'s export is run[1]'s container's, made while it was committed (earlyexport)
    assert b.exported == [base_id] and b.engine.calls.count("export_container") == 1
    assert len(b.cat("/data/big")) == 5000
    assert b.out.read_bytes() == clean_image(tmp_path / "clean-first", text)

    edited = commands("write /etc/one 1", "fill /data/big 5000", FOUR[2], "write /etc/four 44")
    calls = len(b.engine.calls)
    assert b.build(edited) == {"run[3]", "diff[3]", "assemble"}
    assert "export" not in b.engine.calls[calls:] and b.exported == [base_id]
    k = b.keys
    assert chains(b.records())["diff[3]"] == (False, k["diff[1]"], [k["diff[2]"], k["diff[3]"]])
    assert b.cat("/etc/four") == b"44\n" and b.cat("/etc/three") == b"3\n"
    assert b.out.read_bytes() == clean_image(tmp_path / "clean", edited)


def test_the_early_export_gives_the_image_the_export_of_the_layer_gives(
    tmp_path: Path, small_chain: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The anchor's export taken from the container while it was committed, or from the
    layer image after (no early export, or a failed one): the same image, and no partial
    file left in the cache."""
    text = commands("write /etc/one 1", "fill /data/big 5000", *FOUR[2:])
    early = Build(tmp_path / "early", text)
    early.build()
    assert early.engine.calls.count("export_container") == 1
    monkeypatch.setattr(EarlyExports, "hook_for", lambda self, script, step: None)
    late = Build(tmp_path / "late", text)
    late.build()
    assert "export_container" not in late.engine.calls and len(late.exported) == 2
    assert late.out.read_bytes() == early.out.read_bytes()
    monkeypatch.undo()
    monkeypatch.setattr(layerchain, "CHAIN_DATA_BYTES", small_chain)

    def broken(self: FakeEngine, cid: str, dest: Any, **kw: Any) -> None:
        dest.write(b"\0" * 512)  # an export cut short: no end-of-archive marker
        raise EngineError("the engine went away")

    monkeypatch.setattr(FakeEngine, "export_container", broken)
    failed = Build(tmp_path / "failed", text)
    failed.build()
    assert len(failed.exported) == 2  # diff[1] exported the layer image after all
    assert failed.out.read_bytes() == early.out.read_bytes()
    for b in (early, late, failed):
        assert list((b.cache / "tmp").iterdir()) == []


def test_an_early_export_no_step_takes_is_deleted(tmp_path: Path) -> None:
    """Its RUN step ran, its DIFF step did not need it (here: no step adopts it at all)."""
    engine = FakeEngine()
    engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
    store = Store(tmp_path / "cache")
    try:
        early = EarlyExports(store, lambda: engine)
        spec = RunSpec(image="fake/base:1", argv=("true",))
        engine.run_and_commit(
            spec,
            step="run[0]",
            tag="t:1",
            on_output=lambda _: None,
            on_exited=early.hook("k", over=None),
        )
        assert [p.name for p in (store.root / "tmp").iterdir()] == [store.part_path("early-k").name]
        early.settle()
        assert list((store.root / "tmp").iterdir()) == []
        assert early.adopt("k", "key") is None
    finally:
        store.close()


def test_a_chain_that_grows_past_the_limit_starts_again_at_an_anchor(
    tmp_path: Path, small_chain: int
) -> None:
    """Small changes add up: the first one that would take the chain past the limit is an
    anchor, in a warm build as in a clean one."""
    step = small_chain * 2 // 5  # two fit, the third does not
    fills = [f"fill /data/f{i} {step}" for i in range(6)]
    b = Build(tmp_path / "warm", commands(*fills))
    b.build()
    anchors = {sid: anchor for sid, (anchor, _, _) in chains(b.records()).items()}
    assert anchors == {
        "diff[0]": False,
        "diff[1]": False,
        "diff[2]": True,
        "diff[3]": False,
        "diff[4]": False,
        "diff[5]": True,
    }
    # an edit after the anchor: what follows runs again, and diff[5] is an anchor again
    edited = commands(*fills[:3], f"fill /data/f3 {step - 1}", *fills[4:])
    calls = len(b.engine.calls)
    assert b.build(edited) == {f"{kind}[{i}]" for kind in ("run", "diff") for i in (3, 4, 5)} | {
        "assemble"
    }
    assert b.engine.calls[calls:].count("export") == 1
    assert chains(b.records())["diff[5]"] == (True, b.keys["diff[5]"], [])
    assert b.out.read_bytes() == clean_image(tmp_path / "clean", edited)
    assert len(b.cat("/data/f3")) == step - 1


def test_a_change_of_many_entries_is_an_anchor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain is bounded in entries too (4000 in rfs, 20 here), whatever their bytes."""
    monkeypatch.setattr(layerchain, "CHAIN_ENTRIES", 20)
    text = commands("write /etc/one 1", "many /srv 30", "write /etc/three 3")
    b = Build(tmp_path / "warm", text)
    b.build()
    k = b.keys
    assert chains(b.records()) == {
        "diff[0]": (False, "base", [k["diff[0]"]]),
        "diff[1]": (True, k["diff[1]"], []),
        "diff[2]": (False, k["diff[1]"], [k["diff[2]"]]),
    }
    edited = commands("write /etc/one 1", "many /srv 30", "write /etc/three 33")
    assert b.build(edited) == {"run[2]", "diff[2]", "assemble"}
    assert b.cat("/srv/f29") == b"x" and b.cat("/etc/three") == b"33\n"
    assert b.out.read_bytes() == clean_image(tmp_path / "clean", edited)


def test_a_new_engine_version_exports_the_base_again(tmp_path: Path) -> None:
    """The diffs are made again under a new engine version; the base export they are laid on
    must be too, or a warm build lays them on what the old engine exported."""
    b = Build(tmp_path / "warm", commands(*FOUR))
    b.build()
    b.engine._version = "fake-2"
    assert b.build() == {"diff[0]", "diff[1]", "diff[2]", "diff[3]", "assemble"}
    assert len(b.exported) == 2  # the base, under each version
