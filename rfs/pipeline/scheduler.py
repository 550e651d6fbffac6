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
  runners would otherwise hold every slot until a deadline).
- An interrupt (KeyboardInterrupt in the main thread) stops new work, calls `on_interrupt` (the
  pipeline removes its containers there, which ends the commands running in them) and waits for
  the running nodes to end before returning: nothing is left half-done behind the caller's back.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field


def default_jobs() -> int:
    """The number of cores this process may use (its affinity mask, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


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
) -> Outcome:
    """Run every node of `needs` (node -> the nodes it needs; names outside `needs` count as
    done) with `run`, at most `jobs` at once besides the `light` ones; see the module
    docstring."""
    order = {n: i for i, n in enumerate(needs)}
    waiting = {node: set(deps) & needs.keys() for node, deps in needs.items()}
    if _has_cycle(waiting):
        raise ValueError("the graph has a cycle")
    outcome = Outcome()
    if jobs <= 1 and light is None:
        _run_inline(waiting, run, order, outcome)
    else:
        _run_threads(waiting, run, jobs, on_interrupt, order, outcome, light or _heavy)
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
        except Exception as exc:
            outcome.failed[node] = exc
            return
        outcome.done.append(node)
        _finish(waiting, node)


def _run_threads(
    waiting: dict[str, set[str]],
    run: Callable[[str], None],
    jobs: int,
    on_interrupt: Callable[[], None] | None,
    order: Mapping[str, int],
    outcome: Outcome,
    light: Callable[[str], bool],
) -> None:
    running: dict[cf.Future[None], str] = {}
    stopping = False
    workers = max(1, jobs) + sum(1 for node in waiting if light(node))
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rfs-step") as pool:
        try:
            while waiting or running:
                if not stopping:
                    busy = sum(1 for node in running.values() if not light(node))
                    for node in _ready(waiting, order):
                        if light(node) or busy < jobs:
                            busy += not light(node)
                            del waiting[node]
                            running[pool.submit(run, node)] = node
                if not running:
                    break  # stopping, and nothing left in flight
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    stopping |= _collect(future, running.pop(future), waiting, outcome)
        except KeyboardInterrupt:
            outcome.interrupted = True
            if on_interrupt is not None:
                on_interrupt()
            # Let what runs end (its own cleanup included) before the caller cleans up.
            for future in cf.as_completed(list(running)):
                _collect(future, running.pop(future), waiting, outcome)


def _collect(
    future: cf.Future[None], node: str, waiting: dict[str, set[str]], outcome: Outcome
) -> bool:
    """Note how `node` ended; True if it failed (new work must stop)."""
    exc = future.exception()
    if exc is None:
        outcome.done.append(node)
        _finish(waiting, node)
        return False
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
