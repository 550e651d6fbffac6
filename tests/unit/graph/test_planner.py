"""What goes into keys, the build's snapshot of package files, and forcing steps to run:
on plain data and temporary files, no engine."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rfs.graph.compiler import compile_steps
from rfs.graph.inputs import digest_refs
from rfs.graph.planner import Action, forced_closure, made_at, plan_steps, stale_steps
from rfs.graph.steps import Facts, Step
from rfs.host.hashing import digest_input
from rfs.run.snapshot import PackageChanged, PackageSnapshot
from rfs.run.store import Store
from rfs.script.model import BuildScript
from rfs.script.schema import parse_script

SCRIPT = """
[filesystem]
size_mib = 64
[container]
image = { name = "busybox", tag = "1" }
[[commands]]
script_path = "/scripts/a.sh"
[[commands]]
command = "echo two"
max_age = "1d"
[[commands]]
command = "echo three"
[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""
FACTS = Facts(
    base_id="sha256:aaa",
    mkfs_version="mke2fs 1.47.2",
    platform="linux/amd64",
    engine_version="20.10.24",
    code={"run": "r", "export": "e", "diff": "d", "assemble": "a"},
    file_digests={"/scripts/a.sh": "s" * 64, "/files/motd": "m" * 64},
)


def script(text: str = SCRIPT) -> BuildScript:
    return parse_script(tomllib.loads(text))[0]


# The same build, as a type whose assembly reads one export of the last layer.
SQUASHFS = SCRIPT.replace("size_mib = 64", 'size_mib = 64\ntype = "Squashfs"')
COMMANDS = {"run[0]", "run[1]", "run[2]"}
DIFFS = {"diff[0]", "diff[1]", "diff[2]"}


def keys(facts: Facts = FACTS, text: str = SCRIPT) -> dict[str, str]:
    return {step.id: step.key for step in compile_steps(script(text), facts)}


def changed(other: dict[str, str], text: str = SCRIPT) -> set[str]:
    base = keys(text=text)
    assert set(base) == set(other)
    return {k for k in base if base[k] != other[k]}


# --- facts in keys ------------------------------------------------------------------------


def test_network_is_in_every_command_key() -> None:
    facts = dataclasses.replace(FACTS, network=False)
    assert changed(keys(facts)) == COMMANDS | DIFFS | {"assemble"}
    assert changed(keys(facts, SQUASHFS), SQUASHFS) == COMMANDS | {"export", "assemble"}


def test_platform_is_in_the_base_key() -> None:
    facts = dataclasses.replace(FACTS, platform="linux/arm64")
    assert changed(keys(facts)) == {"base"} | COMMANDS | DIFFS | {"assemble"}


def test_engine_version_is_in_the_export_key() -> None:
    facts = dataclasses.replace(FACTS, engine_version="28.0")
    assert changed(keys(facts, SQUASHFS), SQUASHFS) == {"export", "assemble"}


def test_engine_version_is_in_each_diff_key() -> None:
    """A diff step's blob is a layer diff or an export, which differ between versions."""
    facts = dataclasses.replace(FACTS, engine_version="28.0")
    assert changed(keys(facts)) == DIFFS | {"assemble"}
    assert changed(keys(dataclasses.replace(FACTS, engine="podman"))) >= DIFFS


@pytest.mark.parametrize(
    ("kind", "text", "steps"),
    [
        ("run", SCRIPT, COMMANDS | DIFFS | {"assemble"}),
        ("run", SQUASHFS, COMMANDS | {"export", "assemble"}),
        ("export", SQUASHFS, {"export", "assemble"}),
        ("diff", SCRIPT, DIFFS | {"assemble"}),
        ("diff", SQUASHFS, set()),
        ("assemble", SCRIPT, {"assemble"}),
        ("assemble", SQUASHFS, {"assemble"}),
    ],
    ids=["run", "run-squashfs", "export", "diff", "diff-squashfs", "assemble", "assemble-sq"],
)
def test_the_code_of_each_kind_is_in_its_key(kind: str, text: str, steps: set[str]) -> None:
    code = {**FACTS.code, kind: "changed"}
    assert changed(keys(dataclasses.replace(FACTS, code=code), text), text) == steps


def test_tool_versions_are_in_the_assemble_key() -> None:
    assert changed(
        keys(dataclasses.replace(FACTS, mkfs_version="mke2fs 1.47.2; debugfs 1.47.3"))
    ) == {"assemble"}


def test_script_path_is_not_in_the_key_only_its_content() -> None:
    moved = SCRIPT.replace("/scripts/a.sh", "/elsewhere/a.sh")
    facts = dataclasses.replace(
        FACTS, file_digests={"/elsewhere/a.sh": "s" * 64, "/files/motd": "m" * 64}
    )
    assert keys(facts, moved) == keys()


def test_max_age_and_no_cache_are_not_in_any_key() -> None:
    text = SCRIPT.replace('max_age = "1d"', "no_cache = true")
    assert keys(text=text) == keys()
    assert keys(text=SCRIPT.replace('max_age = "1d"\n', "")) == keys()


# --- package file digests ------------------------------------------------------------------


def test_a_files_owner_execute_bit_is_in_its_digest_and_nothing_else_of_its_mode(
    tmp_path: Path,
) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o644)
    plain = digest_input(f)
    f.chmod(0o664)  # group write: a umask difference, not in the image
    assert digest_input(f) == plain
    f.chmod(0o654)  # group execute only: the image would still get 0644
    assert digest_input(f) == plain
    f.chmod(0o744)  # the owner's execute bit: the image gets 0755
    assert digest_input(f) != plain


def test_a_tree_digest_holds_kinds_modes_links_and_contents(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_text("x")
    os.symlink("f", tree / "d" / "link")
    seen = {digest_input(tree)}

    def differs() -> None:
        digest = digest_input(tree)
        assert digest not in seen
        seen.add(digest)

    (tree / "d" / "f").write_text("y")
    differs()
    (tree / "d" / "f").chmod(0o744)
    differs()
    (tree / "d" / "link").unlink()
    os.symlink("elsewhere", tree / "d" / "link")
    differs()
    (tree / "d" / "link").unlink()
    (tree / "d" / "link").write_text("elsewhere")  # a file where the symlink was
    differs()
    before = digest_input(tree)  # f is 0744 since above
    (tree / "d" / "f").chmod(0o754)  # the group's execute bit too: not what the image gets
    assert digest_input(tree) == before


def test_a_file_and_a_tree_never_share_a_digest(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "f").write_text("")
    assert digest_input(tmp_path / "t") != digest_input(tmp_path / "f")


# --- the snapshot ----------------------------------------------------------------------------


def _package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (root / "tree" / "sub" / "run.sh").chmod(0o700)
    (root / "tree" / "data").write_text("data")
    (root / "tree" / "data").chmod(0o600)
    os.symlink("data", root / "tree" / "link")
    (root / "motd").write_text("hello")
    return root


def test_the_snapshot_is_what_was_hashed_with_normalised_modes(tmp_path: Path) -> None:
    root = _package(tmp_path)
    digests = digest_refs(root, ["/tree", "/motd"])
    snap = PackageSnapshot(root, digests)
    try:
        tree = snap.path("/tree")
        assert digest_input(tree) == digests["/tree"]
        assert (tree / "sub" / "run.sh").stat().st_mode & 0o7777 == 0o755
        assert (tree / "data").stat().st_mode & 0o7777 == 0o644
        assert (tree / "sub").stat().st_mode & 0o7777 == 0o755
        assert os.readlink(tree / "link") == "data"
        assert snap.path("/motd").read_text() == "hello"
        assert snap.path("/tree") == tree  # copied once
    finally:
        snap.close()
    assert not tree.exists()


def test_an_edit_after_planning_is_refused_not_recorded_under_the_old_key(tmp_path: Path) -> None:
    root = _package(tmp_path)
    digests = digest_refs(root, ["/tree", "/motd"])
    (root / "motd").write_text("edited while the build ran")
    (root / "tree" / "data").chmod(0o700)
    snap = PackageSnapshot(root, digests)
    try:
        with pytest.raises(PackageChanged, match="/motd changed after rfs planned"):
            snap.path("/motd")
        with pytest.raises(PackageChanged, match="/tree changed"):
            snap.path("/tree")
    finally:
        snap.close()


def test_the_remembered_digest_notices_a_chmod(tmp_path: Path) -> None:
    root = _package(tmp_path)
    memo: dict[str, object] = {}
    first = digest_refs(root, ["/motd"], memo)
    (root / "motd").chmod(0o755)  # same size and mtime: only the ctime tells
    assert digest_refs(root, ["/motd"], memo) != first


# --- forcing and staleness -------------------------------------------------------------------


def _steps() -> list[Step]:
    return compile_steps(script(), FACTS)


def test_a_forced_step_runs_with_everything_after_it() -> None:
    steps = _steps()
    decisions = plan_steps(steps, lambda s: None, {}, {"run[1]": "--rebuild"})
    actions = {d.step.id: d.action for d in decisions}
    assert actions == {
        "base": Action.SKIP,
        "run[0]": Action.CACHED,
        "diff[0]": Action.CACHED,
        "run[1]": Action.RUN,
        "diff[1]": Action.RUN,
        "run[2]": Action.RUN,
        "diff[2]": Action.RUN,
        "overlays": Action.CACHED,
        "assemble": Action.RUN,
    }
    reasons = {d.step.id: d.reason for d in decisions}
    assert reasons["run[1]"] == "--rebuild"
    assert reasons["diff[1]"].startswith("run[1] runs again")
    assert reasons["diff[2]"].startswith("run[2] runs again")


def test_forced_closure_follows_every_path() -> None:
    closure = forced_closure(_steps(), {"overlays": "--rebuild"})
    assert set(closure) == {"overlays", "assemble"}


def test_stale_results_and_what_was_made_from_them() -> None:
    steps = _steps()
    by_id = {s.id: s for s in steps}
    now = 1_000_000.0
    day = 86400
    records: dict[str, dict[str, object]] = {s.key: {"created": now - 10} for s in steps}

    def record(key: str) -> dict[str, object] | None:
        return records.get(key)

    ages = {"run[1]": day}
    # run[2], diff[1] and diff[2] were made from run[1]'s result of 10 s ago
    for sid in ("run[2]", "diff[1]", "diff[2]", "assemble"):
        records[by_id[sid].key]["made_at"] = made_at(by_id[sid], record, by_id)
    assert stale_steps(steps, record, ages, now) == {}
    # a day later run[1] is stale; so is everything made from it
    later = now + day
    stale = stale_steps(steps, record, ages, later)
    assert set(stale) == {"run[1]", "run[2]", "diff[1]", "diff[2]", "assemble"}
    assert stale["run[1]"].startswith("stale: made 1.0d ago")
    # run[1]'s record is gone (evicted): the diffs made from its old result are still stale
    del records[by_id["run[1]"].key]
    assert {"diff[1]", "diff[2]"} <= set(stale_steps(steps, record, ages, later))
    # a record that does not say when its stale-able source was made is stale
    records[by_id["diff[2]"].key].pop("made_at")
    assert "unknown age" in stale_steps(steps, record, ages, now)["diff[2]"]


def test_made_at_collects_the_times_of_stale_able_sources() -> None:
    steps = _steps()
    by_id = {s.id: s for s in steps}
    records: dict[str, dict[str, Any]] = {
        by_id["run[1]"].key: {"created": 5.0},
        by_id["run[2]"].key: {"created": 6.0, "made_at": {by_id["run[1]"].key: 5.0}},
    }
    assert made_at(by_id["run[2]"], records.get, by_id) == {by_id["run[1]"].key: 5.0}
    assert made_at(by_id["diff[2]"], records.get, by_id) == {
        by_id["run[1]"].key: 5.0,
        by_id["run[2]"].key: 6.0,
    }
    assert made_at(by_id["run[0]"], records.get, by_id) == {}


# --- each cache owns its layer tags ----------------------------------------------------------


def test_each_cache_directory_has_its_own_lasting_name(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    try:
        name_a, name_b = a.cache_id, b.cache_id
        assert name_a != name_b and len(name_a) == 12
    finally:
        a.close()
        b.close()
    again = Store(tmp_path / "a")
    try:
        assert again.cache_id == name_a
    finally:
        again.close()


def test_layer_tags_name_their_cache() -> None:
    from rfs.run.executors import layer_tag

    assert layer_tag("k" * 64, "0123456789ab") == f"rfs/layer/0123456789ab:{'k' * 64}"


def test_the_snapshot_shows_no_timestamps_of_the_checkout(tmp_path: Path) -> None:
    root = _package(tmp_path)
    snap = PackageSnapshot(root, digest_refs(root, ["/tree"]), mtime=1_700_000_000)
    try:
        tree = snap.path("/tree")
        times = {p.lstat().st_mtime for p in [tree, *tree.rglob("*")]}
        assert times == {1_700_000_000}
    finally:
        snap.close()


def test_a_tool_upgrade_is_noticed_by_a_long_running_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`rfs build --watch` outlives a tool upgrade: the tools' files change, and the version
    is asked again although the driver remembers it for the process."""
    from rfs.fs import ext4, tools
    from rfs.script.model import FsType

    memo: dict[str, object] = {}
    monkeypatch.setattr(tools, "_identity", lambda names: [["/usr/sbin/mke2fs", 1, 1, 1]])
    monkeypatch.setattr(ext4, "_mke2fs_version", lambda: "mke2fs 1.47.2")
    monkeypatch.setattr(ext4, "_debugfs_version", lambda: "debugfs 1.47.2")
    ext4.mkfs_version.cache_clear()
    assert tools.remembered_tool_version(FsType.EXT4, memo) == "mke2fs 1.47.2; debugfs 1.47.2"
    monkeypatch.setattr(ext4, "_debugfs_version", lambda: "debugfs 1.47.3")
    # unchanged files: the remembered version, no process started
    assert tools.remembered_tool_version(FsType.EXT4, memo) == "mke2fs 1.47.2; debugfs 1.47.2"
    monkeypatch.setattr(tools, "_identity", lambda names: [["/usr/sbin/mke2fs", 2, 2, 2]])
    assert tools.remembered_tool_version(FsType.EXT4, memo) == "mke2fs 1.47.2; debugfs 1.47.3"
    ext4.mkfs_version.cache_clear()


def test_a_signal_while_the_temporary_image_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM right after the temporary file exists, before rfs knows its name: the file is
    still removed (CI once found one left by an interrupted assembly)."""
    import signal
    import tempfile

    from rfs.fs import image
    from rfs.host import signals

    real = tempfile.mkstemp

    def mkstemp_then_signal(dir: Path, prefix: str) -> tuple[int, str]:
        made = real(dir=dir, prefix=prefix)
        os.kill(os.getpid(), signal.SIGTERM)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)  # the module image uses
    with (
        pytest.raises(KeyboardInterrupt),
        signals.handled(),
        image.temp_image(tmp_path / "out.ext4", 1),
    ):
        raise AssertionError("the interrupt comes before the block")
    assert os.listdir(tmp_path) == []
