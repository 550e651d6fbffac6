"""`rfs build --shard I/N` (rfs.pipeline.shard) on the fake engine: the owner function, the
wait and its deadline on an injected clock, the fall-back, and two shards sharing one cache
server. The real engine and the real nginx cache: tests/integration/test_shards.py."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rfs.cli import main
from rfs.engine.fake import FakeEngine, FakeRun
from rfs.errors import EXIT_BAD_INPUT, EXIT_STEP_FAILED, RfsError
from rfs.graph.planner import Action
from rfs.graph.steps import Step, StepKind
from rfs.pipeline.build import Job, Options, execute, execute_all, prepare
from rfs.pipeline.scheduler import Cancelled
from rfs.pipeline.shard import (
    DEFAULT_SECONDS,
    FACTOR,
    FIRST_POLL,
    FLOOR,
    MOST_POLL,
    Fetcher,
    Shard,
    owner,
    parse_shard,
    parse_wait,
    wait_for,
)
from rfs.remote.config import RemoteSettings
from rfs.report.events import JsonReporter
from rfs.report.reporter import Reporter
from rfs.run.store import Store as StepStore
from tests.fakeshell import shell_of
from tests.waiting import until

KEYS = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(300)]  # keys look so


def test_owner_is_stable_and_spreads_the_keys() -> None:
    assert owner("000000000000000a" + "f" * 48, 3) == 10 % 3 + 1
    for count in (1, 2, 3, 7):
        owners = [owner(key, count) for key in KEYS]
        assert set(owners) == set(range(1, count + 1))  # every shard gets work
        assert owners == [owner(key, count) for key in KEYS]  # the same on every runner


@pytest.mark.parametrize("text", ["", "1", "0/3", "4/3", "1/0", "a/b", "1/3/4", "-1/3"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shard(text)


def test_good_shards_and_waits() -> None:
    assert parse_shard("1/1") == (1, 1) and parse_shard("3/3") == (3, 3)
    assert parse_wait("0") == 0.0 and parse_wait("2.5") == 2.5
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_wait(bad)


def test_the_deadline_follows_the_last_known_duration() -> None:
    shard = Shard(1, 3)
    assert shard.deadline(None) == FACTOR * DEFAULT_SECONDS + FLOOR
    assert shard.deadline(10.0) == FACTOR * 10 + FLOOR
    assert Shard(1, 3, wait_s=4.0).deadline(1000.0) == 4.0  # --shard-wait wins


class Clock:
    """Time that moves only when something sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return False


def test_wait_backs_off_and_stops_at_the_deadline() -> None:
    clock = Clock()
    looks: list[float] = []

    def never() -> bool:
        looks.append(clock.now)
        return False

    assert wait_for(never, 30.0, clock, clock.sleep) is False
    assert clock.now == pytest.approx(130.0)  # waited exactly the deadline
    assert clock.sleeps[:4] == [FIRST_POLL * 2**n for n in range(4)]
    assert max(clock.sleeps) == MOST_POLL
    assert len(looks) == len(clock.sleeps) + 1  # a last look at the deadline


def test_wait_ends_when_found_or_given_up() -> None:
    clock = Clock()
    answers = iter([False, False, True])
    assert wait_for(lambda: next(answers), 30.0, clock, clock.sleep) is True
    assert clock.sleeps == [FIRST_POLL, FIRST_POLL * 2]
    assert wait_for(lambda: None, 30.0, clock, clock.sleep) is None  # no server left
    stopping = wait_for(lambda: False, 30.0, clock, lambda s: True)
    assert stopping is None  # the build stops: no more waiting


class Remote:
    """A RemoteCache stand-in: the record appears after `after` polls (never if None)."""

    def __init__(self, after: int | None, fetch_ok: bool = True) -> None:
        self.after = after
        self.fetch_ok = fetch_ok
        self.polls = 0
        self.fetched: list[str] = []
        self.sent: list[str] = []

    def lookup(self, step: Step) -> None:
        return None

    def poll(self, step: Step) -> bool:
        self.polls += 1
        return self.after is not None and self.polls > self.after

    def fetch(self, step: Step) -> bool:
        self.fetched.append(step.id)
        return self.fetch_ok

    def upload(self, steps: list[Step], ran: set[str], cached: set[str]) -> None:
        self.sent.extend(s.id for s in steps)


class Store:
    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds

    def record(self, key: str) -> dict[str, Any] | None:
        return None if self.seconds is None else {"seconds": self.seconds}


class Seen(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int, float]] = []

    def sharded(self, step: Step, what: str, shard: int, seconds: float) -> None:
        self.events.append((what, step.id, shard, seconds))


def step_owned_by(shard: int, count: int) -> Step:
    key = next(k for k in KEYS if owner(k, count) == shard)
    return Step(id="run[0]", kind=StepKind.RUN, label="x", inputs={}, parents=(), key=key)


def fetcher(shard: Shard) -> tuple[Fetcher, Clock]:
    clock = Clock()
    f = Fetcher(shard)
    f.clock, f.sleep = clock, clock.sleep
    return f, clock


def take(f: Fetcher, remote: Remote, store: Store, seen: Seen, step: Step) -> bool:
    return f.take(step, remote, store, seen)  # type: ignore[arg-type]


def test_a_step_is_fetched_once_its_owner_uploads_it() -> None:
    f, _ = fetcher(Shard(1, 3))
    step = step_owned_by(2, 3)
    remote, seen = Remote(after=3), Seen()
    assert take(f, remote, Store(seconds=5.0), seen, step)
    assert remote.fetched == ["run[0]"]
    assert [e[:3] for e in seen.events] == [("waiting", "run[0]", 2), ("fetched", "run[0]", 2)]
    assert seen.events[0][3] == FACTOR * 5.0 + FLOOR  # the local record's duration
    assert seen.events[1][3] == pytest.approx(FIRST_POLL * (1 + 2 + 4))


def test_a_step_never_uploaded_is_built_after_the_deadline() -> None:
    f, clock = fetcher(Shard(1, 3, wait_s=12.0))
    remote, seen = Remote(after=None), Seen()
    assert not take(f, remote, Store(), seen, step_owned_by(3, 3))
    assert remote.fetched == [] and clock.now == pytest.approx(112.0)
    assert [e[0] for e in seen.events] == ["waiting", "deadline"]


def test_a_bad_copy_is_built_here() -> None:
    f, _ = fetcher(Shard(1, 2))
    remote, seen = Remote(after=0, fetch_ok=False), Seen()
    assert not take(f, remote, Store(), seen, step_owned_by(2, 2))
    assert remote.fetched == ["run[0]"] and [e[0] for e in seen.events][-1] == "deadline"


def test_a_stopping_build_stops_waiting() -> None:
    f, _ = fetcher(Shard(1, 2))
    f.sleep = lambda s: True
    with pytest.raises(Cancelled):  # not run: the build stops for what stopped it
        take(f, Remote(after=None), Store(), Seen(), step_owned_by(2, 2))


def test_the_json_events_follow_the_schema() -> None:
    from tests.events import validate_events

    stream = io.StringIO()
    events = JsonReporter(stream)
    step = step_owned_by(2, 3)
    events.sharded(step, "waiting", 2, 270.0)
    events.sharded(step, "fetched", 2, 3.5)
    events.sharded(step, "deadline", 2, 270.0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    validate_events(lines)
    assert [e["event"] for e in lines] == ["step_waiting", "step_fetched", "step_deadline"]
    assert lines[0]["deadline_seconds"] == 270.0 and lines[1]["waited_seconds"] == 3.5
    assert {e["shard"] for e in lines} == {2}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--shard", "4/3"], "I must be between 1 and N"),
        (["--shard", "two"], "not a shard"),
        (["--shard", "1/2"], "give --cache-to URL"),
        (["--shard-wait", "5"], "give --shard I/N too"),
    ],
)
def test_the_command_line_refuses_bad_shards(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    for name in ("RFS_CACHE_TO", "RFS_CACHE_FROM"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv("RFS_CONFIG", str(tmp_path / "config.toml"))
    try:
        code = main(["build", str(tmp_path), "--output-dir", str(tmp_path), *args])
    except SystemExit as exc:  # argparse refuses a bad form itself
        code = int(exc.code or 0)
    assert code == EXIT_BAD_INPUT
    assert says in capsys.readouterr().err


BUILD = """\
[filesystem]
size_mib = 8
[container]
image = { name = "fake/base", tag = "1" }
[[commands]]
command = "write /etc/one 1"
[[commands]]
command = "write /etc/two 2"
[[commands]]
command = "write /etc/three 3"
"""


shell = shell_of(newline=False)


class Runner:
    """One shard: its own package copy, cache directory and fake engine."""

    def __init__(self, root: Path, run: Callable[[FakeRun], int] = shell) -> None:
        root.mkdir(parents=True)
        (root / "pkg").mkdir()
        (root / "pkg" / "build.toml").write_text(BUILD)
        self.root = root
        self.engine = FakeEngine(run)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
        self.out = root / "image.ext4"
        self.seen = Seen()
        self.keys: dict[str, str] = {}  # step id -> key, of the last build

    def build(self, url: str, shard: Shard) -> dict[str, Action]:
        opts = Options(
            self.root / "pkg",
            output=self.out,
            cache_dir=self.root / "cache",
            remote=RemoteSettings(sources=(url,), target=url, timeout_s=5),
        )
        planned = prepare(opts, self.seen, engine_factory=lambda script: self.engine)
        self.keys = {s.id: s.key for s in planned.steps}
        try:
            execute(planned, self.seen, 1, shard)
        finally:
            planned.store.close()
        return {d.step.id: d.action for d in planned.decisions}


def test_two_shards_share_the_work_and_make_the_same_image(tmp_path: Path) -> None:
    from tests.hostileserver import FakeCache

    server = FakeCache()
    try:
        runners = [Runner(tmp_path / f"shard{i}") for i in (1, 2)]
        errors: list[BaseException] = []

        def build(i: int) -> None:
            try:
                runners[i - 1].build(server.url, Shard(i, 2, wait_s=60))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=build, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        # Each command ran once, on one of the two; the other fetched it.
        assert sum(r.engine.calls.count("run") for r in runners) == 3
        for r in runners:
            assert not [e for e in r.seen.events if e[0] == "deadline"]
        fetched = [e[1] for r in runners for e in r.seen.events if e[0] == "fetched"]
        assert len(fetched) == len(set(fetched)) and fetched  # each fetched by the other
        alone = Runner(tmp_path / "alone")
        alone.build(server.url + "other/", Shard(1, 1))
        assert runners[0].out.read_bytes() == runners[1].out.read_bytes()
        assert runners[0].out.read_bytes() == alone.out.read_bytes()
    finally:
        server.stop()


def test_a_shard_alone_builds_what_the_others_never_upload(tmp_path: Path) -> None:
    from tests.hostileserver import FakeCache

    server = FakeCache()
    try:
        r = Runner(tmp_path / "shard2")
        r.build(server.url, Shard(2, 3, wait_s=0))  # shards 1 and 3 never come
        late = {e[1] for e in r.seen.events if e[0] == "deadline"}
        waited = {e[1] for e in r.seen.events if e[0] == "waiting"}
        assert late == waited and late  # every step of the others, built here
        assert r.engine.calls.count("run") == 3
        alone = Runner(tmp_path / "alone")
        alone.build(server.url + "other/", Shard(1, 1))
        assert r.out.read_bytes() == alone.out.read_bytes()
        assert server.records  # and each was uploaded for the others
    finally:
        server.stop()


def test_steps_cached_here_are_uploaded_before_this_runners_own_work(tmp_path: Path) -> None:
    """Steps an earlier build left in this runner's cache go to the shared cache when the run
    starts, in the plan's order, not after the runner's own steps: another shard may be
    waiting for them."""
    from tests.hostileserver import FakeCache

    earlier, shared = FakeCache(), FakeCache()
    on_server: list[set[str]] = []  # the shared cache's records when the new command ran

    def run(ctx: FakeRun) -> int:
        if list(ctx.argv[:2]) == ["write", "/etc/four"]:
            on_server.append(set(shared.records))
        return shell(ctx)

    try:
        r = Runner(tmp_path / "shard1", run)
        r.build(earlier.url, Shard(1, 1))  # run[0..2] and diff[0..2] in this runner's cache
        cached = [r.keys[f"{kind}[{n}]"] for n in range(3) for kind in ("run", "diff")]
        (r.root / "pkg" / "build.toml").write_text(
            BUILD + '[[commands]]\ncommand = "write /etc/four 4"\n'
        )
        actions = r.build(shared.url, Shard(1, 1))
        # run[0] and run[1] are not needed here (run[2] is cached), but an empty runner needs
        # them: they go too.
        skipped, reused = [Action.SKIP] * 2, [Action.CACHED]
        assert [actions[f"run[{n}]"] for n in range(4)] == [*skipped, *reused, Action.RUN]
        assert on_server == [set(cached)]  # before the new command, all six
        puts = [
            req.removeprefix("PUT /ac/") for req in shared.requests if req.startswith("PUT /ac/")
        ]
        assert puts[:6] == cached  # the order the others need them in
        assert len(puts) == len(set(puts))  # and not sent again at the end
    finally:
        earlier.stop()
        shared.stop()


class Pair:
    """Two packages of one command each, one cache, one fake engine, built by one runner of
    two shards: `mine`'s command is this runner's, `theirs`' the other shard's (its content is
    picked so); the other shard never comes."""

    def __init__(self, root: Path, mine: str, run: Callable[[FakeRun], int] = shell) -> None:
        from tests.hostileserver import FakeCache

        self.root, self.server, self.seen = root, FakeCache(), Seen()
        self.engine = FakeEngine(run)
        self.engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
        (root / "out").mkdir()
        self.store = StepStore(root / "cache")
        self.mine = self.job("mine", mine)
        self.shard = owner(self.first_key(self.mine), 2)
        self.theirs = next(
            j
            for n in range(64)
            if owner(self.first_key(j := self.job("theirs", f"write /etc/n {n}")), 2) != self.shard
        )

    def job(self, name: str, command: str) -> Job:
        pkg = self.root / name
        pkg.mkdir(exist_ok=True)
        text = BUILD.split("[[commands]]")[0] + f'[[commands]]\ncommand = "{command}"\n'
        (pkg / "build.toml").write_text(text)
        url = self.server.url
        remote = RemoteSettings(sources=(url,), target=url, timeout_s=5)
        opts = Options(pkg, cache_dir=self.root / "cache", output_dir=self.root / "out")
        opts.remote = remote
        planned = prepare(opts, self.seen, lambda s: self.engine, store=self.store)
        return Job(planned, self.seen, name)

    @staticmethod
    def first_key(job: Job) -> str:
        return next(s.key for s in job.planned.steps if s.id == "run[0]")

    def build(self, jobs: int, wait_s: float) -> BaseException | None:
        """Build both (in a thread, which must end within 60 s); what it raised."""
        errors: list[BaseException] = []

        def build() -> None:
            try:
                execute_all([self.mine, self.theirs], jobs, Shard(self.shard, 2, wait_s))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the build did not end within 60 s"
        return errors[0] if errors else None

    def close(self) -> None:
        self.server.stop()
        self.store.close()


def test_a_failure_of_this_runner_ends_its_waits_for_the_others(tmp_path: Path) -> None:
    """This runner's own step fails while it waits for another shard's step of the other
    package, whose deadline is far off (600 s). The wait ends at once; the build reports the
    failure, leaves no container and builds nothing after it."""

    def run(ctx: FakeRun) -> int:
        if ctx.argv[0] == "fail":  # fails once this runner waits for the other shard
            until(lambda: bool(pair.seen.events), "the wait for the other shard")
        return shell(ctx)

    pair = Pair(tmp_path, "fail", run)
    try:
        error = pair.build(2, wait_s=600)
    finally:
        pair.close()
    assert isinstance(error, RfsError) and error.exit_code == EXIT_STEP_FAILED
    assert "package mine" in str(error) and "package theirs" not in str(error)
    assert [e[0] for e in pair.seen.events] == ["waiting"]  # ended: neither fetched nor built
    assert pair.engine.calls.count("run") == 1 and not pair.engine.kept


def test_a_step_built_after_its_deadline_holds_one_of_the_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other shard's step, built here once its deadline passed, runs in one of the -j
    slots (Slots.held; what a slot guarantees: tests/unit/pipeline/test_scheduler.py), not
    beside them; this runner's own step holds the one the scheduler gave it."""
    import rfs.pipeline.execution as execution
    from rfs.pipeline.scheduler import Slots

    holding = threading.local()

    class Recording(Slots):
        @contextlib.contextmanager
        def held(self) -> Iterator[None]:
            with super().held():
                holding.slot = True
                try:
                    yield
                finally:
                    holding.slot = False

    in_slot: dict[str, bool] = {}

    def run(ctx: FakeRun) -> int:
        in_slot[ctx.argv[1]] = getattr(holding, "slot", False)
        return shell(ctx)

    monkeypatch.setattr(execution, "Slots", Recording)
    pair = Pair(tmp_path, "write /etc/mine 1", run)
    try:
        assert pair.build(1, wait_s=0) is None
    finally:
        pair.close()
    assert {e[:2] for e in pair.seen.events} >= {("waiting", "run[0]"), ("deadline", "run[0]")}
    assert in_slot == {"/etc/mine": False, "/etc/n": True}
