"""rfs.pipeline.scheduler on its own: order, dependencies, -j, failures and interrupts, with
plain Python runners (the pipeline on the fake engine is
tests/unit/pipeline/test_many_packages.py)."""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable

import pytest

from rfs.host import signals
from rfs.pipeline.scheduler import Cancelled, Slots, default_jobs, run_graph
from tests.waiting import until

CHAIN = {"base": set(), "a": {"base"}, "b": {"a"}, "side": set(), "end": {"b", "side"}}


class Recorder:
    """A runner that records when nodes start and end, and how many run at once."""

    def __init__(self, action: Callable[[str], object] | None = None) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()
        self.action = action

    def __call__(self, node: str) -> None:
        with self._lock:
            self.started.append(node)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.action is not None:
                self.action(node)
        finally:
            with self._lock:
                self.running -= 1
                self.ended.append(node)


def test_one_job_runs_in_the_graphs_order_in_this_thread() -> None:
    threads: set[int] = set()
    rec = Recorder(lambda node: threads.add(threading.get_ident()))
    outcome = run_graph(CHAIN, rec, jobs=1)
    assert outcome.ok and rec.started == ["base", "a", "b", "side", "end"] and rec.most == 1
    assert threads == {threading.get_ident()}


def test_dependencies_come_first_whatever_the_jobs() -> None:
    for jobs in (1, 2, 4):
        rec = Recorder()
        assert run_graph(CHAIN, rec, jobs=jobs).ok
        for node, deps in CHAIN.items():
            assert all(rec.ended.index(d) < rec.started.index(node) for d in deps), (jobs, node)


def test_independent_nodes_run_at_once_with_jobs() -> None:
    # Each of the two waits for the other: they can only both pass if they overlap.
    barrier = threading.Barrier(2, timeout=30)
    rec = Recorder(lambda node: barrier.wait() if node in ("x", "y") else None)
    outcome = run_graph({"x": set(), "y": set(), "z": {"x", "y"}}, rec, jobs=2)
    assert outcome.ok and rec.most == 2 and rec.started[-1] == "z"


def test_never_more_than_jobs_at_once() -> None:
    rec = Recorder()
    graph = {f"n{i}": set[str]() for i in range(20)}
    assert run_graph(graph, rec, jobs=3).ok
    assert rec.most <= 3 and sorted(rec.ended) == sorted(graph)


def fail_on(bad: set[str], before: Callable[[str], object] | None = None) -> Callable[[str], None]:
    def action(node: str) -> None:
        if before is not None:
            before(node)
        if node in bad:
            raise RuntimeError(f"{node} broke")

    return action


def test_a_failure_stops_new_work_and_lets_running_nodes_finish() -> None:
    failed = threading.Event()

    def before(node: str) -> None:
        if node == "slow":  # still running when "bad" fails
            assert failed.wait(30)
        if node == "bad":
            failed.set()

    rec = Recorder(fail_on({"bad"}, before))
    graph = {"slow": set(), "bad": set(), "after": {"slow"}}
    outcome = run_graph(graph, rec, jobs=2)
    assert list(outcome.failed) == ["bad"] and str(outcome.failed["bad"]) == "bad broke"
    assert outcome.done == ["slow"] and outcome.not_run == ["after"]
    assert "after" not in rec.started and not outcome.ok


def test_every_failure_is_returned() -> None:
    barrier = threading.Barrier(2, timeout=30)
    rec = Recorder(fail_on({"p", "q"}, lambda node: barrier.wait()))
    outcome = run_graph({"p": set(), "q": set(), "r": {"p"}}, rec, jobs=2)
    assert sorted(outcome.failed) == ["p", "q"] and outcome.not_run == ["r"]


def test_one_job_stops_at_the_first_failure() -> None:
    rec = Recorder(fail_on({"a"}))
    outcome = run_graph(CHAIN, rec, jobs=1)
    assert list(outcome.failed) == ["a"] and outcome.done == ["base"]
    assert outcome.not_run == ["b", "side", "end"]


def test_an_interrupt_in_a_runner_ends_the_run() -> None:
    def action(node: str) -> None:
        if node == "a":
            raise KeyboardInterrupt

    outcome = run_graph(CHAIN, Recorder(action), jobs=1)
    assert outcome.interrupted and list(outcome.failed) == ["a"] and outcome.done == ["base"]


def test_an_interrupt_of_the_main_thread_stops_running_nodes_and_waits_for_them() -> None:
    """Ctrl-C reaches the main thread while workers run: `on_interrupt` is called (the pipeline
    removes its containers there) and run_graph returns only once the workers have ended."""
    stop = threading.Event()
    started = threading.Barrier(2, timeout=30)

    def action(node: str) -> None:
        if node == "worker":
            started.wait()
            assert stop.wait(30)  # as a command ends when its container is removed
            raise RuntimeError("stopped")
        if node == "signaller":
            started.wait()
            _thread.interrupt_main()  # what the SIGINT handler does

    rec = Recorder(action)
    graph = {"worker": set(), "signaller": set(), "later": {"signaller"}}
    with signals.handled():
        outcome = run_graph(graph, rec, jobs=2, on_interrupt=stop.set)
    assert outcome.interrupted and stop.is_set()
    assert rec.running == 0 and sorted(rec.ended) == ["signaller", "worker"]
    assert "worker" in outcome.failed and "later" in outcome.not_run


def test_unknown_dependencies_count_as_done_and_cycles_are_refused() -> None:
    rec = Recorder()
    assert run_graph({"a": {"elsewhere"}}, rec, jobs=2).ok and rec.ended == ["a"]
    with pytest.raises(ValueError, match="cycle"):
        run_graph({"a": {"b"}, "b": {"a"}}, rec, jobs=2)


def test_default_jobs_is_the_cores_this_process_may_use() -> None:
    assert default_jobs() >= 1


def test_light_nodes_run_beside_the_jobs() -> None:
    # Two waits (light) and one step: all three must run at once with jobs=1; the step alone
    # holds the one slot, so a second heavy node waits for it.
    meet = threading.Barrier(3, timeout=10)
    seen: list[str] = []
    lock = threading.Lock()

    def run(node: str) -> None:
        if node != "after":
            meet.wait()
        with lock:
            seen.append(node)

    needs: dict[str, set[str]] = {"step": set(), "wait1": set(), "wait2": set(), "after": set()}
    outcome = run_graph(needs, run, 1, light=lambda n: n.startswith("wait"))
    assert outcome.ok and sorted(seen) == sorted(needs)
    assert seen.index("after") > seen.index("step")


def test_a_light_node_that_turns_heavy_takes_a_slot_before_waiting_nodes() -> None:
    """With one slot: a wait whose deadline passed builds its step only once the running step
    has ended, and before the step that was ready all along; never two at once."""
    slots = Slots(1)
    inside: list[str] = []  # heavy work, in the order it started
    rec = Recorder()
    lock = threading.Lock()
    at_once = [0, 0]  # now, most

    def work(node: str) -> None:
        with lock:
            inside.append(node)
            at_once[0] += 1
            at_once[1] = max(at_once)
        if node == "first":  # ends only once the wait claims its slot
            until(lambda: slots.claims == 1, "the light node's claim")
        with lock:
            at_once[0] -= 1

    def run(node: str) -> None:
        if node == "wait":
            with slots.held():  # the deadline passed: build it here
                work(node)
        else:
            work(node)

    rec.action = run
    needs: dict[str, set[str]] = {"first": set(), "wait": set(), "ready": set()}
    outcome = run_graph(needs, rec, 1, light=lambda n: n == "wait", slots=slots)
    assert outcome.ok and inside == ["first", "wait", "ready"] and at_once[1] == 1
    assert slots.busy == 0 and slots.claims == 0


def test_a_claimed_slot_is_never_a_deadlock() -> None:
    """Heavy nodes that need the light one cannot hold the slots it waits for: they start
    only once it has ended."""
    slots = Slots(2)
    order: list[str] = []

    def run(node: str) -> None:
        if node == "wait":
            with slots.held():
                order.append(node)
        else:
            order.append(node)

    needs = {"wait": set(), "a": {"wait"}, "b": {"wait"}, "c": {"wait"}}
    outcome = run_graph(needs, run, 2, light=lambda n: n == "wait", slots=slots)
    assert outcome.ok and order[0] == "wait" and sorted(order[1:]) == ["a", "b", "c"]


def test_a_failure_ends_the_waits_and_the_claims_at_once() -> None:
    """A failing node stops the run: `on_stop` ends the light nodes' waits (as the pipeline
    ends the waits for other shards) and pending slot claims give up; both count as not run,
    and the run returns without waiting for any deadline."""
    slots = Slots(1)
    stop = threading.Event()
    calls: list[str] = []

    def run(node: str) -> None:
        if node == "wait":  # a wait for another runner's upload
            if not stop.wait(60):
                raise AssertionError("the wait ran to its deadline")
            raise Cancelled("stopped waiting")
        if node == "claim":
            with slots.held():  # never gets the slot "bad" holds
                raise AssertionError("a stopping run gave a slot")
        if node == "bad":
            until(lambda: slots.claims == 1, "the claim")
            raise RuntimeError("bad broke")

    def on_stop() -> None:
        calls.append("stop")
        stop.set()

    needs: dict[str, set[str]] = {"bad": set(), "wait": set(), "claim": set(), "after": {"wait"}}
    light = {"wait", "claim"}.__contains__
    outcome = run_graph(needs, run, 1, light=light, slots=slots, on_stop=on_stop)
    assert list(outcome.failed) == ["bad"] and calls == ["stop"]
    assert sorted(outcome.not_run) == ["after", "claim", "wait"] and not outcome.interrupted
