"""Execute planned builds: the steps that must run, as one graph over every package, through
`rfs.pipeline.scheduler`; recording, reporting, cleanup and remote uploads around them."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rfs.errors import Interrupted, RfsError, StepFailed
from rfs.graph.explain import remembered_text
from rfs.graph.inputs import command_refs, overlay_refs
from rfs.graph.planner import Action, Decision, made_at, manifest, plan_steps
from rfs.graph.steps import Step, StepKind
from rfs.host import signals
from rfs.host.orphans import remove_orphans
from rfs.pipeline.dockerfilebase import rebuild_base
from rfs.pipeline.model import KEEP_LABEL, OWNER_LABEL, RUN_LABEL, Planned
from rfs.pipeline.scheduler import Slots, run_graph
from rfs.pipeline.shard import Fetcher, Shard
from rfs.report.reporter import Reporter, Tee, artifact_size
from rfs.run.executors import ENGINE_STEPS, SCRATCH_PREFIX, Executor

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.remote.sync import RemoteCache
    from rfs.run.store import Store

log = logging.getLogger("rfs.pipeline.build")


@dataclass
class Job:
    """One package of a build: its plan, the reporter that shows it, and what it did."""

    planned: Planned
    reporter: Reporter
    name: str = ""  # the package's name when several are built together, for messages
    ran: set[str] = field(default_factory=set)  # keys of the steps it ran
    kept: dict[str, str] = field(default_factory=dict)  # --keep-failed: container -> step

    def label(self, step: Step) -> str:
        """How messages name `step`: `<package>/<step>` when several packages build."""
        return f"{self.name}/{step.id}" if self.name else step.id


def execute(
    planned: Planned, reporter: Reporter, jobs: int = 1, shard: Shard | None = None
) -> None:
    """Run the steps the plan says must run, recording each once it is complete."""
    execute_all([Job(planned, reporter)], jobs, shard)


def execute_all(packages: list[Job], jobs: int = 1, shard: Shard | None = None) -> None:
    """Run the steps every package's plan says must run, as one graph: a step several packages
    share (the same key) runs once, independent steps run up to `jobs` at a time.

    A failure stops new work and lets the running steps finish; an interrupt also removes the
    build's containers, which ends the commands in them. Every failure is reported; the error
    raised names them all (and keeps the exit code of the first). With `shard` (rfs build
    --shard, rfs.pipeline.shard) the steps other shards own are taken from the shared cache.
    """
    for job in packages:
        planned = job.planned
        if planned.remote is not None:  # download what the plan takes from a remote cache
            try:
                planned.decisions = _materialize(planned, planned.remote)
            finally:
                planned.remote.report_ignored()
        job.reporter.planned(planned.decisions)
    for job in packages:
        decisions, ex = job.planned.decisions, job.planned.executor
        if any(d.action is Action.RUN and d.step.kind in ENGINE_STEPS for d in decisions):
            remove_abandoned(ex.engine)
        if any(d.action is Action.RUN for d in decisions):
            # What killed builds left on disk: scratch directories, half-written images.
            remove_orphans(Path(tempfile.gettempdir()), SCRATCH_PREFIX)
            remove_orphans(ex.output.parent, f".{ex.output.name}.rfs-tmp-")
            job.planned.store.remove_parts()
    try:
        # The package files the steps to run will use are copied now, while they are still
        # what the keys were computed from (a step checks its copies either way).
        for job in packages:
            if job.planned.executor.snapshot is not None:
                job.planned.executor.snapshot.take(_refs_to_run(job.planned))
            built = job.planned.dockerfile
            if built is not None and built.fresh:
                dockerfile = job.planned.script.container.dockerfile
                job.reporter.message(f"  building the base from {dockerfile} again: --no-cache")
                rebuild_base(job.planned, built)
        _run_union(packages, jobs, Fetcher(shard) if shard is not None else None)
    finally:
        for job in packages:
            ex = job.planned.executor
            if ex.snapshot is not None:
                ex.snapshot.close()
            ex.settle()  # the exports of containers no step took are deleted
            # Packages share the run label: what one keeps, every package's clean-up keeps.
            _remove_containers(ex, _kept(packages))
            if job.planned.remote is not None:
                _upload(job.planned.remote, job.planned, job.ran)
    keep: dict[int, tuple[Store, set[str]]] = {}
    for job in packages:
        planned = job.planned
        manifests: dict[str, object] = {
            s.id: {**manifest(s), **remembered_text(planned.script, s)} for s in planned.steps
        }
        manifests["_output"] = str(planned.executor.output)
        planned.store.save_manifests(planned.script_id, manifests)
        store_keep = keep.setdefault(id(planned.store), (planned.store, set()))[1]
        store_keep.update(s.key for s in planned.steps)
    for store, keys in keep.values():  # once, with every package's steps kept
        store.evict(keep=keys)


def _run_union(packages: list[Job], jobs: int, fetcher: Fetcher | None = None) -> None:
    """Schedule every decision of every package as one graph and run it; raise what failed.

    A step to run is one node per key: the first package that runs it owns it; every other
    package whose plan runs or reuses that key waits for it (a forced step rewrites what they
    would reuse). Any other reused step is a node of its own, so with `jobs=1` the reporter
    sees the plan's order.
    """
    owners: dict[str, tuple[int, str]] = {}  # key -> (package, step id) that runs it
    for n, job in enumerate(packages):
        for d in job.planned.decisions:
            if d.action is Action.RUN:
                owners.setdefault(d.step.key, (n, d.step.id))
    nodes: dict[str, tuple[Job, Decision]] = {}
    sharers: dict[str, list[tuple[Job, Decision]]] = {}
    needs: dict[str, set[str]] = {}
    for n, job in enumerate(packages):
        by_id = {s.id: s for s in job.planned.steps}
        node_of: dict[str, str] = {}
        for d in job.planned.decisions:
            shared = d.step.key in owners and d.action is not Action.SKIP
            node = d.step.key if shared else f"{n}/{d.step.id}"
            node_of[d.step.id] = node
            needs.setdefault(node, set()).update(node_of[p] for p in d.step.parents if p in by_id)
            if not shared or owners[d.step.key] == (n, d.step.id):
                nodes[node] = (job, d)
            else:
                sharers.setdefault(node, []).append((job, d))

    def theirs(node: str) -> bool:
        """A step another shard makes: this runner waits for it outside the -j slots, and
        takes one only if it builds the step itself (the owner was too late)."""
        d = nodes[node][1]
        return fetcher is not None and d.action is Action.RUN and not fetcher.shard.owns(d.step)

    if fetcher is not None:  # what this shard makes first (a stable sort keeps the plan's order)
        needs = dict(sorted(needs.items(), key=lambda item: theirs(item[0])))

    def run(node: str) -> None:
        with signals.interruptible():  # in a worker thread: see _Interruptible
            run_node(node)

    def run_node(node: str) -> None:
        job, d = nodes[node]
        if d.action is not Action.RUN:
            _reuse(job, d)
            return
        remote = job.planned.remote
        if fetcher is not None and remote is not None and _from_owner(fetcher, job, d, remote):
            recorded = (job.planned.store.record(d.step.key) or {}).get("seconds")
            job.reporter.reused(d.step, Action.CACHED, recorded)
        else:
            with slots.held() if theirs(node) else contextlib.nullcontext():
                _run_step(job, d)
                if fetcher is not None and remote is not None and d.step.key in job.ran:
                    fetcher.send(d.step, remote)  # now, not at the end: other shards wait for it
        for other, shared in sharers.get(node, []):  # made once, for every package needing it
            other.reporter.reused(shared.step, Action.CACHED, None)

    def stop_containers() -> None:
        """The interrupt reached the main thread: end what the worker threads run."""
        if fetcher is not None:
            fetcher.stop.set()
        signals.stop_children()  # their tools (mke2fs…), as a Ctrl-C to the terminal would
        for job in packages:
            _remove_containers(job.planned.executor, _kept(packages))

    slots = Slots(jobs)
    reporters = [job.planned.executor.reporter for job in packages]
    for job, reporter in zip(packages, reporters, strict=True):
        job.planned.executor.reporter = _Interruptible(reporter)
    try:
        if fetcher is not None:  # what other shards may wait for, before this runner's work
            fetcher.offer_cached([job.planned for job in packages])
        outcome = run_graph(
            needs,
            run,
            jobs,
            stop_containers,
            light=theirs if fetcher is not None else None,
            slots=slots,
            # This runner's own failure ends its waits for other shards at once.
            on_stop=fetcher.stop.set if fetcher is not None else None,
        )
    except KeyboardInterrupt:  # between steps, or a third signal while stopping
        raise _interrupted([], sum(len(job.ran) for job in packages)) from None
    finally:
        for job, reporter in zip(packages, reporters, strict=True):
            job.planned.executor.reporter = reporter
    ran = sum(len(job.ran) for job in packages)
    if outcome.interrupted:
        # A step that failed too failed of the interrupt: in a worker thread, its tool can die
        # of the Ctrl-C before the main thread has handled it (_run_step cannot tell yet).
        stopped = [nodes[n] for n in outcome.failed]
        raise _interrupted([job.label(d.step) for job, d in stopped], ran)
    if not outcome.failed:
        return
    failures = [(nodes[n][0], exc) for n, exc in outcome.failed.items()]
    first = failures[0][1]
    if len(failures) == 1 and not failures[0][0].name:
        raise first
    if not all(isinstance(exc, RfsError) for _, exc in failures):
        raise first  # a bug: its traceback matters more than the others
    text = "; ".join(
        f"package {job.name}: {exc}" if job.name else str(exc) for job, exc in failures
    )
    error = RfsError(text, getattr(first, "hint", None))
    error.exit_code = getattr(first, "exit_code", error.exit_code)
    raise error from first


class _Interruptible(Tee):
    """An executor's reporter while the steps run. A signal raises KeyboardInterrupt in the
    main thread only; a step in a worker thread (-j) stops where it reports progress (between
    the chunks of an export), and cleans up as it would in the main thread. Its commands end
    as the interrupt removes their containers, its tools as it signals them."""

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        signals.check()
        super().progress(step, done, total)


def _kept(packages: list[Job]) -> list[str]:
    """The containers every package keeps for inspection (`--keep-failed`)."""
    return [container for job in packages for container in job.kept]


def _from_owner(fetcher: Fetcher, job: Job, d: Decision, remote: RemoteCache) -> bool:
    """Whether `d`'s step, owned by another shard, is now in the local cache: waited for and
    downloaded (False: this runner builds it; it owns it, or the owner did not deliver)."""
    step, ex = d.step, job.planned.executor
    if fetcher.shard.owns(step) or d.forced or ex.missing(step) is None:
        return False
    if step.kind is StepKind.ASSEMBLE and job.planned.script.outputs:
        return False  # side outputs are made from the export here, with the image
    return fetcher.take(step, remote, job.planned.store, job.reporter)


def _reuse(job: Job, d: Decision) -> None:
    """Report a step the plan reuses (cached or not needed) and keep it fresh in the cache."""
    store = job.planned.store
    if d.action is Action.CACHED:
        store.touch(d.step.key)
    # What the step took when it ran: the time the cache saves now.
    recorded = (store.record(d.step.key) or {}).get("seconds")
    job.reporter.reused(d.step, d.action, recorded)


def _run_step(job: Job, d: Decision) -> None:
    """Run one step and record it; report it failed (and raise) if it does not complete."""
    planned, reporter = job.planned, job.reporter
    store, ex = planned.store, planned.executor
    by_id = {s.id: s for s in planned.steps}
    # One process builds a step; another that needs it waits, then reuses it.
    lock = store.build_lock(
        d.step.key,
        on_wait=functools.partial(
            reporter.message, f"  waiting  {job.label(d.step):<10} another rfs build is making it"
        ),
    )
    try:
        if not d.forced and ex.missing(d.step) is None:
            reporter.reused(d.step, Action.CACHED, None)
            return
        reporter.started(d.step, d.reason)
        t0 = time.monotonic()
        try:
            record = ex.run(d.step, by_id, planned.facts.base_id)
        except KeyboardInterrupt:
            reporter.failed(d.step, time.monotonic() - t0, "interrupted")
            raise
        except RfsError as exc:
            if signals.received() is not None:
                # Ctrl-C reaches the whole process group: a tool rfs runs (mke2fs) may die
                # of it first, and its failure is the interrupt's doing; so does a command
                # whose container the interrupt removed.
                reporter.failed(d.step, time.monotonic() - t0, "interrupted")
                raise KeyboardInterrupt from exc
            reporter.failed(d.step, time.monotonic() - t0, exc.message)
            if isinstance(exc, StepFailed) and exc.container:
                # --keep-failed: the user will inspect it
                job.kept[exc.container] = job.label(d.step)
            if type(exc) is RfsError:  # a plain failure of the step itself
                raise StepFailed(d.step.id, exc.message) from exc
            raise
        seconds = time.monotonic() - t0
        sources = made_at(d.step, store.record, by_id)
        store.put_record(
            d.step.key,
            {
                "kind": d.step.kind.value,
                "step": d.step.id,
                "inputs": dict(d.step.inputs),
                "seconds": round(seconds, 3),
                **record,
                **({"made_at": sources} if sources else {}),
            },
        )
    finally:
        lock.release()
    job.ran.add(d.step.key)
    reporter.finished(
        d.step,
        seconds,
        artifact_size(d.step, record, ex.output),
        detail=str(record.get("route", "")),
    )


def _materialize(planned: Planned, remote: RemoteCache) -> list[Decision]:
    """Download what the plan takes from remote caches; return the final plan.

    A failed download is a miss from then on, and the build is planned again, so a bad image
    object falls back to the export, a bad export to the layer, and so on. Bounded: each round
    either succeeds or loses at least one remote copy.
    """
    decisions = planned.decisions
    ex = planned.executor
    for _ in range(len(planned.steps) + 1):
        todo = [
            d.step
            for d in decisions
            if d.action is Action.CACHED
            and d.step.key in remote.found
            and ex.missing(d.step) is not None
        ]
        fetched = [remote.fetch(step) for step in todo]
        if all(fetched):
            return decisions
        decisions = plan_steps(
            planned.steps, remote.availability(ex.missing), planned.previous, planned.forced
        )
    return decisions


def _refs_to_run(planned: Planned) -> list[str]:
    """The package references the steps that will run read."""
    script = planned.script
    refs: set[str] = set()
    for d in planned.decisions:
        if d.action is not Action.RUN:
            continue
        if d.step.kind is StepKind.RUN and d.step.index is not None:
            refs.update(command_refs(script, d.step.index))
        elif d.step.kind is StepKind.ASSEMBLE:
            refs.update(overlay_refs(script))
    return sorted(refs)


def _interrupted(steps: list[str], finished: int) -> Interrupted:
    """The one-line summary of an interrupted build (`steps`: those it stopped)."""
    signum = signals.received()
    how = f"interrupted by {signals.name(signum)}" if signum is not None else "interrupted"
    where = f" during {', '.join(steps)}" if steps else ""
    done = f"{finished} step(s) finished and are cached" if finished else "no step finished"
    return Interrupted(f"{how}{where}: {done}; nothing half-done was kept")


def _labels(run_id: str, keep_failed: bool) -> dict[str, str]:
    """The labels every container of this build carries."""
    labels = {RUN_LABEL: run_id, OWNER_LABEL: _owner(os.getpid()) or "unknown"}
    if keep_failed:
        labels[KEEP_LABEL] = "1"
    return labels


def _owner(pid: int) -> str | None:
    """ "<host>:<pid>:<start time>" of process `pid` if it is alive, else None.

    The start time (field 22 of /proc/<pid>/stat) tells a reused pid from the original.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces
    if len(fields) < 20:
        return None
    return f"{socket.gethostname()}:{pid}:{fields[19]}"


def remove_abandoned(engine: Engine) -> int:
    """Remove the containers of rfs builds on this machine whose process is gone; return how
    many went. A build killed with SIGKILL, or one whose engine died and came back, leaves its
    containers; the next build clears them. Builds still running and `--keep-failed` builds
    are left alone, and so is everything when the engine cannot tell (a warning, not a failure).
    """
    host = socket.gethostname()
    try:
        found = engine.container_labels(OWNER_LABEL)
        dead = set()
        for labels in found.values():
            owner = labels.get(OWNER_LABEL, "")
            parts = owner.split(":")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue  # another machine's, or a container made from a layer image
            if not labels.get(KEEP_LABEL) and _owner(int(parts[1])) != owner:
                dead.add(owner)
        # By owner, not by run id: builds may share a run id (RFS_RUN_ID in a CI job).
        removed = sum(engine.remove_containers(f"{OWNER_LABEL}={owner}") for owner in sorted(dead))
    except RfsError as exc:
        log.warning("could not look for containers of dead rfs builds: %s", exc)
        return 0
    if removed:
        log.info("removed %d container(s) left by rfs builds that died", removed)
    return removed


def _remove_containers(ex: Executor, kept: list[str]) -> None:
    """Remove every container of this build but those kept for inspection.

    While an error is on its way out, a failure here (the engine that just died, say) is only
    logged: it must not replace the error that explains why the build ended. The next build
    removes what is left (`remove_abandoned`).
    """
    failing = sys.exc_info()[1]
    if ex._engine is None:
        return
    try:
        ex.engine.remove_containers(f"{RUN_LABEL}={ex.labels[RUN_LABEL]}", keep=kept)
    except RfsError as exc:
        if failing is None:
            raise
        log.warning(
            "could not remove the containers of this build (label %s=%s; the next build will): %s",
            RUN_LABEL,
            ex.labels[RUN_LABEL],
            exc,
        )


def _upload(remote: RemoteCache, planned: Planned, ran: set[str]) -> None:
    """Upload what succeeded, also after a failed step (never after an interrupt)."""
    failing = sys.exc_info()[1]
    if isinstance(failing, KeyboardInterrupt | Interrupted):
        return
    cached = {d.step.key for d in planned.decisions if d.action is Action.CACHED}
    try:
        remote.upload(planned.steps, ran, cached)
    except RfsError:
        if failing is None:  # --cache-strict; a failing step's error matters more
            raise
    finally:
        remote.close()
