"""The pieces behind "nothing lost, nothing left behind", without an engine: signals, the
removal of dead builds' containers, and a damaged cache."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

from rfs.engine.fake import FakeEngine
from rfs.errors import EngineError
from rfs.host import signals
from rfs.pipeline.build import KEEP_LABEL, OWNER_LABEL, RUN_LABEL, _owner, remove_abandoned
from rfs.run.store import Store

# -- signals ---------------------------------------------------------------------------------


def test_sigterm_becomes_keyboard_interrupt_and_only_once() -> None:
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)  # let the handler run
        # Clean-up in progress: a second signal must not cut it short.
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.1)
        assert signals.received() == signal.SIGTERM
        # A third one gives up on the clean-up.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# -- containers of dead builds ---------------------------------------------------------------


class Engine(FakeEngine):
    """The fake engine holding `containers` (ID -> labels), recording each removal asked for;
    with `fail`, it cannot list them."""

    def __init__(self, containers: dict[str, dict[str, str]], fail: bool = False) -> None:
        super().__init__()
        self.kept.update(containers)
        self.fail = fail
        self.removed: list[str] = []

    def container_labels(self, label: str) -> dict[str, dict[str, str]]:
        if self.fail:
            raise EngineError("the engine is gone")
        return super().container_labels(label)

    def remove_containers(self, label: str, *, keep: Collection[str] = ()) -> int:
        self.removed.append(label)
        return super().remove_containers(label, keep=keep)


def _dead_owner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = _owner(proc.pid)
    proc.wait()
    assert owner is not None and _owner(proc.pid) != owner
    return owner


def test_only_containers_of_dead_local_builds_are_removed() -> None:
    alive = _owner(os.getpid())
    dead = _dead_owner()
    assert alive is not None
    engine = Engine(
        {
            "a": {RUN_LABEL: "ci-job", OWNER_LABEL: dead},
            "b": {RUN_LABEL: "ci-job", OWNER_LABEL: dead},
            "c": {RUN_LABEL: "ci-job", OWNER_LABEL: alive},  # same run id, a live process
            "d": {RUN_LABEL: "kept", OWNER_LABEL: _dead_owner(), KEEP_LABEL: "1"},  # --keep-failed
            "e": {RUN_LABEL: "remote", OWNER_LABEL: "elsewhere:1:1"},  # another machine's
            "f": {RUN_LABEL: "", OWNER_LABEL: ""},  # made by someone from a layer image
        }
    )
    assert remove_abandoned(engine) == 2
    assert engine.removed == [f"{OWNER_LABEL}={dead}"]
    assert sorted(engine.kept) == ["c", "d", "e", "f"]


def test_an_unanswering_engine_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert remove_abandoned(Engine({}, fail=True)) == 0
    assert "could not look for containers of dead rfs builds" in caplog.text


# -- a damaged cache -------------------------------------------------------------------------


def test_damaged_index_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    store.put_record("k", {"blob_size": 1, "blob_digest": "x"})
    (tmp_path / "blobs" / "k").write_bytes(b"x")
    store.close()
    (tmp_path / "index" / "cache.db").write_bytes(b"garbage" * 1000)

    store = Store(tmp_path)
    assert store.record("k") is None
    assert list((tmp_path / "blobs").iterdir()) == []  # unverifiable without their records
    store.put_record("k", {"a": 1})
    assert store.record("k") is not None
    store.close()
    assert "is damaged" in caplog.text


def test_damaged_record_is_a_miss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.put_record("k", {"a": 1})
    store.close()
    db = sqlite3.connect(tmp_path / "index" / "cache.db")
    with db:  # a pickled value whose bytes went bad
        db.execute(
            "UPDATE Cache SET value = ?, mode = 4 WHERE key = ?",
            (b"\x80\x04not a pickle", "step/k"),
        )
    db.close()
    store = Store(tmp_path)
    assert store.record("k") is None
    store.close()


def test_busy_index_is_not_mistaken_for_damage(tmp_path: Path) -> None:
    from rfs.run.store import _damaged

    assert not _damaged(sqlite3.OperationalError("database is locked"))
    assert _damaged(sqlite3.DatabaseError("file is not a database"))


def test_files_of_killed_processes_are_removed(tmp_path: Path) -> None:
    from rfs.host.orphans import remove_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, gone = os.getpid(), dead.pid
    (tmp_path / f"rfs-step-{gone}-abc").mkdir()
    (tmp_path / f"rfs-step-{gone}-abc" / "script").write_text("x")
    (tmp_path / f"rfs-step-{mine}-def").mkdir()  # this process: alive
    (tmp_path / f"rfs-step-{os.getppid()}-ghi").mkdir()  # another live process
    (tmp_path / "rfs-step-xyz").mkdir()  # no pid in the name: cannot tell, kept
    (tmp_path / f".image.ext4.rfs-tmp-{gone}-q1").write_bytes(b"half an image")
    (tmp_path / f".other.ext4.rfs-tmp-{gone}-q2").write_bytes(b"another output's")

    assert remove_orphans(tmp_path, "rfs-step-") == [tmp_path / f"rfs-step-{gone}-abc"]
    assert remove_orphans(tmp_path, ".image.ext4.rfs-tmp-") == [
        tmp_path / f".image.ext4.rfs-tmp-{gone}-q1"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f"rfs-step-{mine}-def",
            f"rfs-step-{os.getppid()}-ghi",
            "rfs-step-xyz",
            f".other.ext4.rfs-tmp-{gone}-q2",
        ]
    )
