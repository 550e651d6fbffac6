"""Run the nodes of a dependency graph, up to `jobs` at a time.

The scheduler knows nothing of steps, engines or caches: it is handed each node's dependencies
and a runner (dvc's `reproduce` with its `repro_fn` is the model), so the pipeline decides what
a node is and the scheduler only decides when it runs. That keeps it testable with any runner.

- A node starts once every node it depends on has finished; ready nodes start in the order the
  graph lists them, so `jobs=1` runs exactly the sequence a plain loop would.
- `jobs=1` runs every node in the calling thread: the single-package build behaves as it did
  before the scheduler existed. With more, nodes run in worker threads while the calling (main)
  thread waits, so SIGINT/SIGTERM (which Python delivers to the main thread) reach it there.
- A failure stops new work; the nodes already running finish, and every failure is returned.
- `light` nodes (`rfs build --shard`: waiting for another runner's upload) do not count
  against `jobs`: they start as soon as they are ready, each in a thread of its own, so a wait
  never keeps this runner from the work it could do meanwhile (waits on each other across
  runners would otherwise hold every slot until a deadline). A light node that turns heavy
  (the wait's deadline passed: the step is built here) takes one of the `jobs` slots with
  `Slots.held()`, ahead of the nodes not yet started. It cannot deadlock: a node starts only
  once what it needs has finished, so no slot holder waits on a light node, and every holder
  gives its slot back when it ends.
- A node may raise `Cancelled` when it gives up because the run is stopping (a light node's
  wait, a claim for a slot): it counts as not run, neither done nor failed.
- A failure calls `on_stop` (the pipeline ends its waits for other shards there) and stops the
  slot claims, so nothing that waits keeps the run going after it.
- An interrupt (KeyboardInterrupt in the main thread) stops new work, calls `on_interrupt` (the
  pipeline removes its containers there, which ends the commands running in them) and waits for
  the running nodes to end before returning: nothing is left half-done behind the caller's back.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass, field


def default_jobs() -> int:
    """The number of cores this process may use (its affinity mask, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class Cancelled(Exception):
    """A node gave up because the run is stopping (a failure elsewhere, an interrupt): it
    counts as not run."""


class Slots:
    """The `jobs` slots that heavy nodes hold while they run (thread-safe).

    The scheduler takes a slot for each heavy node it starts (`take`, never blocking) and the
    node's thread gives it back when it ends. A light node that turns heavy claims one with
    `held()`, which blocks until one is free: a claim reserves the next free slot, so the
    scheduler starts a new node only while `busy + claims < jobs`. `stop()` ends every claim
    (Cancelled) and refuses new ones: a stopping run starts nothing new.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs)
        self.busy = 0  # slots held
        self.claims = 0  # light nodes waiting for a slot
        self.stopping = False
        self._cond = threading.Condition()

    def take(self) -> bool:
        """Take a slot for a node the scheduler starts, if one is free and unclaimed."""
        with self._cond:
            if self.stopping or self.busy + self.claims >= self.jobs:
                return False
            self.busy += 1
            return True

    def release(self, failed: bool = False) -> None:
        """Give a slot back; `failed`: its node failed, so the run stops before the slot can go
        to a claim (the scheduler hears of the failure only later, in another thread)."""
        with self._cond:
            self.busy -= 1
            self.stopping |= failed
            self._cond.notify_all()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold a slot for the body (a light node's own build); Cancelled if the run stops
        before one is free."""
        with self._cond:
            self.claims += 1
            try:
                self._cond.wait_for(lambda: self.stopping or self.busy < self.jobs)
            finally:
                self.claims -= 1
            if self.stopping:
                raise Cancelled("the build is stopping")
            self.busy += 1
        ended = False
        try:
            yield
            ended = True
        finally:
            self.release(failed=not ended)

    def stop(self) -> None:
        """End every claim and refuse new ones."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()


@dataclass
class Outcome:
    """How a run of the graph ended."""

    done: list[str] = field(default_factory=list)  # in the order they finished
    failed: dict[str, BaseException] = field(default_factory=dict)  # node -> what it raised
    not_run: list[str] = field(default_factory=list)  # never started (a failure or interrupt)
    interrupted: bool = False  # a KeyboardInterrupt ended the run

    @property
    def ok(self) -> bool:
        """Every node ran and none failed."""
        return not self.failed and not self.not_run and not self.interrupted


def run_graph(
    needs: Mapping[str, Set[str]],
    run: Callable[[str], None],
    jobs: int = 1,
    on_interrupt: Callable[[], None] | None = None,
    light: Callable[[str], bool] | None = None,
    slots: Slots | None = None,
    on_stop: Callable[[], None] | None = None,
) -> Outcome:
    """Run every node of `needs` (node -> the nodes it needs; names outside `needs` count as
    done) with `run`, at most `jobs` at once besides the `light` ones; see the module
    docstring. `slots`: the run's slots, for light nodes that turn heavy (`jobs` is then
    `slots.jobs`); `on_stop`: called once when a failure stops the run."""
    order = {n: i for i, n in enumerate(needs)}
    waiting = {node: set(deps) & needs.keys() for node, deps in needs.items()}
    if _has_cycle(waiting):
        raise ValueError("the graph has a cycle")
    outcome = Outcome()
    if slots is None:
        slots = Slots(jobs)
    if slots.jobs <= 1 and light is None:
        _run_inline(waiting, run, order, outcome)
    else:
        stops = _Stops(slots, on_interrupt, on_stop)
        _run_threads(waiting, run, slots, stops, order, outcome, light or _heavy)
    outcome.not_run = [n for n in needs if n not in outcome.failed and n not in set(outcome.done)]
    return outcome


def _heavy(node: str) -> bool:
    return False


def _ready(waiting: dict[str, set[str]], order: Mapping[str, int]) -> list[str]:
    return sorted((n for n, deps in waiting.items() if not deps), key=order.__getitem__)


def _finish(waiting: dict[str, set[str]], node: str) -> None:
    for deps in waiting.values():
        deps.discard(node)


def _run_inline(
    waiting: dict[str, set[str]],
    run: Callable[[str], None],
    order: Mapping[str, int],
    outcome: Outcome,
) -> None:
    while waiting:
        ready = _ready(waiting, order)
        node = ready[0]
        del waiting[node]
        try:
            run(node)
        except KeyboardInterrupt as exc:
            outcome.failed[node] = exc
            outcome.interrupted = True
            return
        except Cancelled:
            return
        except Exception as exc:
            outcome.failed[node] = exc
            return
        outcome.done.append(node)
        _finish(waiting, node)


@dataclass
class _Stops:
    """What a stopping run ends: the slot claims, and the caller's waits or containers."""

    slots: Slots
    on_interrupt: Callable[[], None] | None
    on_stop: Callable[[], None] | None
    stopped: bool = False

    def stop(self, interrupted: bool) -> None:
        self.slots.stop()
        if interrupted and self.on_interrupt is not None:
            self.on_interrupt()
        elif not interrupted and not self.stopped and self.on_stop is not None:
            self.on_stop()
        self.stopped = True


def _run_threads(
    waiting: dict[str, set[str]],
    run: Callable[[str], None],
    slots: Slots,
    stops: _Stops,
    order: Mapping[str, int],
    outcome: Outcome,
    light: Callable[[str], bool],
) -> None:
    running: dict[cf.Future[None], str] = {}

    def heavy(node: str) -> None:
        ended = False
        try:
            run(node)
            ended = True
        finally:
            slots.release(failed=not ended)  # now, in this thread: a light node may wait for it

    workers = slots.jobs + sum(1 for node in waiting if light(node))
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rfs-step") as pool:
        try:
            while waiting or running:
                if not stops.stopped:
                    for node in _ready(waiting, order):
                        if light(node):
                            running[pool.submit(run, node)] = node
                        elif slots.take():
                            running[pool.submit(heavy, node)] = node
                        else:
                            continue
                        del waiting[node]
                if not running:
                    break  # stopping, or nothing left that can start
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    if _collect(future, running.pop(future), waiting, outcome):
                        stops.stop(interrupted=False)
        except KeyboardInterrupt:
            outcome.interrupted = True
            stops.stop(interrupted=True)
            # Let what runs end (its own cleanup included) before the caller cleans up.
            for future in cf.as_completed(list(running)):
                _collect(future, running.pop(future), waiting, outcome)


def _collect(
    future: cf.Future[None], node: str, waiting: dict[str, set[str]], outcome: Outcome
) -> bool:
    """Note how `node` ended; True if the run must stop (it failed, or gave up)."""
    exc = future.exception()
    if exc is None:
        outcome.done.append(node)
        _finish(waiting, node)
        return False
    if isinstance(exc, Cancelled):
        return True  # not run: the run was stopping already
    outcome.failed[node] = exc
    if isinstance(exc, KeyboardInterrupt):
        outcome.interrupted = True
    return True


def _has_cycle(waiting: Mapping[str, Set[str]]) -> bool:
    left = {n: set(d) for n, d in waiting.items()}
    while left:
        free = [n for n, d in left.items() if not d]
        if not free:
            return True
        for n in free:
            del left[n]
        for d in left.values():
            d.difference_update(free)
    return False
