"""`rfs build --shard I/N`: N runners share one build through a shared remote cache.

Every runner is given the same packages and plans the same steps. Each step has one owner
shard, `owner(key, N)`: the first 16 hex digits of its key as a number, modulo N, plus one
(stable across runners, machines and rfs versions: the key is the step's content). A runner
first uploads what its own cache holds and the shared one may lack (`offer_cached`), then
runs the steps it owns (before any it would wait for) and uploads each as soon as it
completes; for a step another shard owns it polls the shared cache (backing off from 0.25 s
to 2 s) until the step's record appears, then downloads it through the remote fetch path,
which checks everything it downloads. If the record has not appeared by the step's deadline,
the runner builds the step itself (in one of the -j slots): a runner that dies or lags costs
time, never the result (the step's key fixes what it makes). When the build stops (a failure
of this runner's, an interrupt) every wait ends at once (`Cancelled`).

The deadline is `--shard-wait SECONDS` when given, else `FACTOR` times the step's last known
duration (the `seconds` of a local or remote record of its key) plus `FLOOR`, with
`DEFAULT_SECONDS` for a step never timed. No server-side locking is needed: two runners that
build the same step (after a deadline) upload records of the same content under the same name.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rfs.graph.planner import Action
from rfs.graph.steps import Step, StepKind
from rfs.pipeline.scheduler import Cancelled

if TYPE_CHECKING:
    from rfs.pipeline.model import Planned
    from rfs.remote.sync import RemoteCache
    from rfs.report.reporter import Reporter
    from rfs.run.store import Store

FACTOR = 2.0  # times the last known duration: an owner as slow as last time is still in time
FLOOR = 30.0  # seconds on top: the owner's download of the step's parents, its upload
DEFAULT_SECONDS = 120.0  # a step never timed (no record of its key anywhere)
FIRST_POLL = 0.25  # seconds between the first looks at the shared cache
MOST_POLL = 2.0  # the back-off stops here: a look is one small GET, and a late look costs time
# The kinds a remote cache carries; anything else is made by every runner.
SHARED_KINDS = frozenset({StepKind.RUN, StepKind.EXPORT, StepKind.DIFF, StepKind.ASSEMBLE})

_FORM = re.compile(r"([0-9]{1,6})/([0-9]{1,6})")


@dataclass(frozen=True)
class Shard:
    """This runner's part of a sharded build: shard `index` of `count` (1-based)."""

    index: int
    count: int
    wait_s: float | None = None  # --shard-wait: the deadline of every step, if given

    def owns(self, step: Step) -> bool:
        """Whether this runner builds `step` (steps the remote cache cannot carry: always)."""
        return step.kind not in SHARED_KINDS or owner(step.key, self.count) == self.index

    def deadline(self, last_seconds: float | None) -> float:
        """How long to wait for a step another shard owns before building it here."""
        if self.wait_s is not None:
            return self.wait_s
        return FACTOR * (DEFAULT_SECONDS if last_seconds is None else last_seconds) + FLOOR


def owner(key: str, count: int) -> int:
    """The shard (1..count) that builds the step of `key`."""
    return int(key[:16], 16) % count + 1


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (argparse type of --shard): a usage error for another form or I out of 1..N."""
    match = _FORM.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a shard: {text!r} (the form is I/N, e.g. 2/3)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"shard {text}: I must be between 1 and N (1/{count})")
    return index, count


def parse_wait(text: str) -> float:
    """SECONDS of --shard-wait: a number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e7:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r} (try 60, 600)")
    return value


def wait_for(
    look: Callable[[], bool | None],
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], bool] | None = None,
) -> bool | None:
    """Call `look` until it answers True (found) or None (give up now), or `deadline_s` has
    passed; back off between looks. `sleep(s)` returns True when the build is stopping.
    True if found; False at the deadline; None if `look` or `sleep` gave up."""
    if sleep is None:
        sleep = threading.Event().wait  # never set: sleeps, answers False
    t0 = clock()
    delay = FIRST_POLL
    while True:
        found = look()
        if found is None or found:
            return found
        left = deadline_s - (clock() - t0)
        if left <= 0:
            return False
        if sleep(min(delay, left)):
            return None
        delay = min(delay * 2, MOST_POLL)


class Fetcher:
    """A runner's side of the shared cache during the steps: takes the steps other shards own
    from it, sends the steps this runner made at once. One request at a time (the backends'
    connections are not shared between threads)."""

    def __init__(self, shard: Shard, stop: threading.Event | None = None) -> None:
        self.shard = shard
        # Set when the build stops (an interrupt, or a failure of this runner's own): every
        # wait ends at once instead of running to its deadline.
        self.stop = stop or threading.Event()
        self.lock = threading.Lock()
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], bool] = self.stop.wait  # True: the build is stopping

    def take(self, step: Step, remote: RemoteCache, store: Store, reporter: Reporter) -> bool:
        """Wait for the owner of `step` to upload it, then download it; True if it is in the
        local cache now, False if this runner must build it (reported)."""
        who = owner(step.key, self.shard.count)
        local = store.record(step.key) or {}
        with self.lock:
            found = remote.lookup(step)
        remote_seconds = found[1].fields.get("seconds") if found is not None else None
        deadline = self.shard.deadline(_seconds(local.get("seconds"), remote_seconds))
        reporter.sharded(step, "waiting", who, deadline)
        t0 = self.clock()

        def look() -> bool | None:
            with self.lock:
                return remote.poll(step)

        stopping: list[bool] = []

        def sleep(seconds: float) -> bool:
            if self.sleep(seconds):
                stopping.append(True)
            return bool(stopping)

        got = wait_for(look, deadline, self.clock, sleep)
        if stopping:
            # The build is stopping (a failure here, an interrupt): nothing more to wait for.
            raise Cancelled(f"stopped waiting for {step.id}")
        waited = self.clock() - t0
        if got:
            with self.lock:
                fetched = remote.fetch(step)
            if fetched:
                reporter.sharded(step, "fetched", who, waited)
                return True
        reporter.sharded(step, "deadline", who, waited)
        return False

    def send(self, step: Step, remote: RemoteCache) -> None:
        """Upload `step`, which this runner just made, for the other shards."""
        with self.lock:
            remote.upload([step], {step.key}, set())

    def offer_cached(self, plans: list[Planned]) -> None:
        """Upload, before any step runs, the steps this runner has in its own cache (an earlier
        build made them) that the shared cache may lack: other shards that found no copy when
        they planned wait for them, and the end of this build would be too late. That is every
        step a plan reuses, and every step it skips (not needed here: later steps are cached)
        whose result is here, as a runner with an empty cache needs it. Every package's first
        step goes before any second one, the order in which the other shards come to need
        them; what the target holds, or was sent before, is not sent again (RemoteCache.upload).
        """
        todo: list[tuple[int, int, RemoteCache, Step]] = []
        for n, planned in enumerate(plans):
            remote, ex = planned.remote, planned.executor
            if remote is None:
                continue
            for i, d in enumerate(planned.decisions):
                step = d.step
                if step.kind not in SHARED_KINDS or step.key in remote.found:
                    continue  # not carried by a shared cache, or planning found it there
                skipped = d.action is Action.SKIP
                if d.action is Action.CACHED or (
                    skipped and remote.unsent(step.key) and ex.missing(step) is None
                ):
                    todo.append((i, n, remote, step))
        offered: set[str] = set()
        for _, _, remote, step in sorted(todo, key=lambda item: item[:2]):
            if step.key not in offered:
                offered.add(step.key)
                with self.lock:
                    remote.upload([step], set(), {step.key})


def _seconds(*values: Any) -> float | None:
    for value in values:
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None
