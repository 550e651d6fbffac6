"""Load, compile, plan and execute a build: the flow from build script to image file."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import Interrupted, RfsError, StepFailed
from rfs.graph.compiler import build_graph, compile_steps
from rfs.graph.explain import remembered_text
from rfs.graph.inputs import (
    DIGEST_MEMO,
    command_refs,
    digest_refs,
    overlay_refs,
    package_refs,
    source_date_epoch,
)
from rfs.graph.planner import (
    Action,
    Availability,
    Decision,
    made_at,
    manifest,
    plan_steps,
    stale_steps,
    staleness,
)
from rfs.graph.steps import Facts, Step, StepKind
from rfs.host import signals
from rfs.host.hashing import digest_bytes
from rfs.host.orphans import remove_orphans
from rfs.report.reporter import Reporter, artifact_size
from rfs.run.basefacts import DockerfileBase, engine_facts, quick_engine_facts
from rfs.run.executors import ENGINE_STEPS, SCRATCH_PREFIX, Executor, layer_tag
from rfs.run.snapshot import PackageSnapshot
from rfs.run.store import DEFAULT_SIZE_LIMIT, Store, default_cache_dir
from rfs.script.model import BuildScript
from rfs.script.package import Loaded, load, resolve_reference

if TYPE_CHECKING:
    import networkx as nx

    from rfs.engine.base import Engine
    from rfs.host.locks import FileLock
    from rfs.remote.config import RemoteSettings
    from rfs.remote.sync import RemoteCache
    from rfs.script.buildcontext import ContextEntry

RUN_LABEL = "org.rfs.run"
# "<host>:<pid>:<process start time>" of the rfs process that created a container, so a later
# build can tell the containers of a build that died (SIGKILL, a crashed engine restarted
# later) from those of a build still running, and remove only the former.
OWNER_LABEL = "org.rfs.owner"
# On every container of a `--keep-failed` build: what it leaves is left on purpose.
KEEP_LABEL = "org.rfs.keep"

log = logging.getLogger("rfs.pipeline.build")


@dataclass
class Options:
    """What the user asked for, independent of how it was asked (CLI, tests)."""

    package: Path
    output: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = DEFAULT_SIZE_LIMIT
    network: bool = True
    keep_failed: bool = False  # keep the container of a failed command for inspection
    remote: RemoteSettings | None = None  # remote caches to read and write (rfs.remote)
    no_cache: bool = False  # run every step; its result replaces the cached one
    rebuild: tuple[str, ...] = ()  # step ids to run again, with every step after them
    pull: bool = False  # look the base image's tag up in its registry again
    platform: str | None = None  # --platform: wins over container.platform


@dataclass
class Planned:
    """A compiled and planned build, ready to execute."""

    loaded: Loaded
    steps: list[Step]
    decisions: list[Decision]
    facts: Facts
    executor: Executor
    store: Store
    script_id: str
    previous: dict[str, Any] = field(default_factory=dict)
    remote: RemoteCache | None = None
    forced: dict[str, str] = field(default_factory=dict)  # step id -> why it runs regardless
    dockerfile: DockerfileBase | None = None  # a `container.dockerfile` base, as keyed
    _graph: nx.DiGraph | None = None

    @property
    def graph(self) -> nx.DiGraph:
        """The step graph (built on first use; also used to plan again after a failed
        remote download)."""
        if self._graph is None:
            self._graph = build_graph(self.steps)
        return self._graph

    @property
    def script(self) -> BuildScript:
        """The build script being built."""
        return self.loaded.script

    def to_run(self) -> list[Decision]:
        """The decisions whose steps will run."""
        return [d for d in self.decisions if d.action is Action.RUN]


def connect_engine(script: BuildScript) -> Engine:
    """Connect to the engine the script asks for."""
    from rfs.engine import connect

    c = script.container
    return connect(c.engine.value, c.connection_uri)


def prepare(
    opts: Options,
    reporter: Reporter,
    engine_factory: Callable[[BuildScript], Engine] = connect_engine,
) -> Planned:
    """Load the package, gather facts, compile the graph and plan each step."""
    loaded = load(opts.package)
    if opts.platform is not None:
        from rfs.script.platform import with_platform

        loaded = dataclasses.replace(loaded, script=with_platform(loaded.script, opts.platform))
    script = loaded.script
    _check_emulation(script)
    store = Store(opts.cache_dir, opts.cache_size)
    # CI can name the run (its job id, say) so leftover containers are attributable.
    run_id = os.environ.get("RFS_RUN_ID") or uuid.uuid4().hex[:12]
    # Connected on first use: a build whose image is up to date never needs the docker SDK.
    engine = functools.cache(lambda: engine_factory(script))
    memo = store.meta(DIGEST_MEMO)
    remembered = dict(memo)  # entries are replaced, never changed in place
    # An archive package is unpacked to a new directory each run: its paths are not worth
    # remembering.
    entries: list[ContextEntry] = []
    if script.container.dockerfile is not None:
        from rfs.script.buildcontext import context_entries, context_refs

        try:
            entries = context_entries(script)
        except OSError as exc:  # an unreadable directory in the context
            from rfs.errors import Problem, ScriptError

            where = exc.filename or script.container.context
            raise ScriptError(
                [
                    Problem(
                        "container.context",
                        f"cannot read {where} of the build context: {exc.strerror or exc}",
                        str(script.script_file),
                    )
                ]
            ) from exc
    refs = package_refs(script) + (context_refs(entries) if entries else [])
    digests = digest_refs(
        script.package_root, sorted(set(refs)), memo if script.origin is None else None
    )
    if memo != remembered:
        store.set_meta(DIGEST_MEMO, memo)
    # Times 0, as copy-in's: SOURCE_DATE_EPOCH is in no command's key, so what commands see
    # must not depend on it.
    snapshot = PackageSnapshot(script.package_root, digests, mtime=0)
    # The socket shortcut is for the engine `connect_engine` would reach; an engine handed in
    # (a fake one, in tests) answers for itself.
    from rfs.fs.tools import remembered_tool_version
    from rfs.graph.codeversion import code_version

    code = {kind: code_version(kind) for kind in ("run", "export", "assemble")}
    quick = not opts.pull and engine_factory is connect_engine
    from_images = _from_images(script, engine, quick=quick, pull=opts.pull)
    built = _dockerfile_base(
        script, digests, entries, code, store, from_images, fresh=opts.no_cache
    )
    found = quick_engine_facts(script, digests, built) if quick else None
    if found is None:
        found = engine_facts(engine(), script, digests, snapshot, pull=opts.pull, built=built)
    if built is not None:
        _record_dockerfile_base(store, built, found.base_id, script.container.engine.value)
    _check_platform(script, found.platform)

    tools = store.meta("tool-versions")
    known_tools = dict(tools)
    mkfs_version = remembered_tool_version(script.filesystem.type, tools)
    if tools != known_tools:
        store.set_meta("tool-versions", tools)
    facts = Facts(
        base_id=found.base_id,
        file_digests=digests,
        mkfs_version=mkfs_version,
        engine=script.container.engine.value,
        source_date_epoch=source_date_epoch(),
        platform=found.platform,
        engine_version=found.engine_version,
        network=opts.network,
        code=code,
        context=_context_digests(entries, digests),
        from_images=from_images,
    )
    steps = compile_steps(script, facts)
    script_file = script.origin or (
        (script.package_root or opts.package.resolve().parent) / script.script_file.name
    )
    script_id = digest_bytes(str(script_file.resolve()).encode())
    previous = store.last_manifests(script_id)
    output = opts.output or Path(str(previous.get("_output", "image.ext4")))
    executor = Executor(
        script,
        store,
        engine,
        reporter,
        output,
        source_date_epoch=facts.source_date_epoch,
        labels=_labels(run_id, opts.keep_failed),
        network=opts.network,
        keep_failed=opts.keep_failed,
        snapshot=snapshot,
        no_cache=opts.no_cache,
    )
    store.hold({s.key for s in steps})  # no eviction removes these while this build runs
    available: Availability = executor.missing
    remote: RemoteCache | None = None
    if opts.remote is not None and opts.remote.enabled:
        from rfs.remote.sync import RemoteCache

        remote = RemoteCache(opts.remote, store, executor, reporter)
        ages = max_ages(script)
        if ages:
            remote.stale = staleness(steps, ages, time.time())
        available = remote.availability(executor.missing)
    planned = Planned(
        loaded,
        steps,
        [],
        facts,
        executor,
        store,
        script_id,
        previous=previous,
        remote=remote,
        dockerfile=built,
    )
    planned.forced = forced_steps(steps, script, store, opts)
    planned.decisions = plan_steps(steps, available, previous, planned.forced)
    return planned


def _context_digests(entries: list[ContextEntry], digests: dict[str, str]) -> dict[str, str]:
    if not entries:
        return {}
    from rfs.script.buildcontext import context_digests

    return context_digests(entries, digests)


def _check_emulation(script: BuildScript) -> None:
    """Fail before anything runs when the host cannot run the platform's programs."""
    from rfs.run.checks import SETUP_HINT, emulation_problem

    why = emulation_problem(script)
    if why is not None:
        from rfs.errors import EnvironmentProblem

        raise EnvironmentProblem(f"container.platform: {why}", hint=SETUP_HINT)


def _check_platform(script: BuildScript, found: str) -> None:
    """Refuse a base image of another platform than the one asked for: there is no registry
    to resolve the base for it, and commands would run as the image's platform."""
    c = script.container
    if c.platform is None:
        return
    from rfs.script.platform import matches

    if not found or not matches(c.platform, found):
        from rfs.errors import EnvironmentProblem

        raise EnvironmentProblem(
            f"container.platform: the base image {c.base_label} is "
            f"{found or 'of a platform the engine does not name'}, not {c.platform}",
            hint=f"make or load a {c.platform} base image, or build for the base's platform "
            "(container.platform, --platform)",
        )


def _from_images(
    script: BuildScript, engine: Callable[[], Engine], *, quick: bool, pull: bool
) -> dict[str, dict[str, str]]:
    """The images a `container.dockerfile` base's stages refer to, resolved by the engine
    (empty without one). The Dockerfile is read as it is now; the build checks that its checked
    copy names the same images (`rfs.run.basefacts`)."""
    c = script.container
    if c.dockerfile is None:
        return {}
    from rfs.run.basefacts import from_image_facts

    assert script.package_root is not None
    text = resolve_reference(script.package_root, c.dockerfile).read_bytes()
    return from_image_facts(script, text, engine, quick=quick, pull=pull)


def _dockerfile_base(
    script: BuildScript,
    digests: dict[str, str],
    entries: list[ContextEntry],
    code: dict[str, str],
    store: Store,
    from_images: dict[str, dict[str, str]],
    *,
    fresh: bool = False,
) -> DockerfileBase | None:
    """A `container.dockerfile` base's key (what it is built from) and context, or None."""
    if script.container.dockerfile is None:
        return None
    from rfs.graph.compiler import dockerfile_tag_key

    facts = Facts(
        base_id="",
        file_digests=digests,
        engine=script.container.engine.value,
        code=code,
        context=_context_digests(entries, digests),
        from_images=from_images,
    )
    key = dockerfile_tag_key(script, facts)
    store.hold({key})  # no eviction removes its image while this build runs
    tag = layer_tag(key, store.cache_id)
    return DockerfileBase(key, tuple(entries), tag, fresh, tuple(from_images))


def _record_dockerfile_base(
    store: Store, built: DockerfileBase, image_id: str, engine: str
) -> None:
    """Record the image a Dockerfile base built (or found), like a layer: `rfs cache prune`
    and `clear` remove its tag with the entry."""
    record = store.record(built.key)
    if record is not None and record.get("image_id") == image_id:
        store.touch(built.key)
        return
    store.put_record(
        built.key,
        {
            "kind": "dockerfile",
            "tag": built.tag,
            "image_id": image_id,
            "inputs": {"engine": engine},
        },
    )


def _rebuild_dockerfile_base(planned: Planned, built: DockerfileBase) -> None:
    """`--no-cache`: build the Dockerfile base again, every instruction, before the commands
    run on it. Its key stays (the inputs did not change); the tag and record move to the new
    image. (Planning resolved the base already, and built it if it was missing.)"""
    from rfs.run.basefacts import rebuild_dockerfile_base

    ex = planned.executor
    image_id = rebuild_dockerfile_base(ex.engine, planned.script, built, ex.snapshot)
    planned.facts = dataclasses.replace(planned.facts, base_id=image_id)
    engine = planned.script.container.engine.value
    _record_dockerfile_base(planned.store, built, image_id, engine)


def max_ages(script: BuildScript) -> dict[str, int]:
    """Step id -> the `max_age` (seconds) of each command that has one."""
    return {
        f"run[{i}]": cmd.max_age_s
        for i, cmd in enumerate(script.commands)
        if cmd.max_age_s is not None
    }


def forced_steps(
    steps: list[Step], script: BuildScript, store: Store, opts: Options
) -> dict[str, str]:
    """The steps that must run whatever is cached, and why: `--no-cache`, `--rebuild`,
    commands with `no_cache`, and results older than a command's `max_age` (the planner adds
    every step after them)."""
    ids = [s.id for s in steps]
    unknown = [r for r in opts.rebuild if r not in ids]
    if unknown:
        from rfs.errors import UsageError

        raise UsageError(
            f"--rebuild {unknown[0]}: no such step; the steps of this build are {', '.join(ids)}"
        )
    if opts.no_cache:
        return {s.id: "--no-cache" for s in steps if s.kind is not StepKind.BASE}
    forced = {step_id: "--rebuild" for step_id in opts.rebuild}
    for i, cmd in enumerate(script.commands):
        if cmd.no_cache:
            forced.setdefault(f"run[{i}]", f"commands[{i}].no_cache: runs on every build")
    ages = max_ages(script)
    if ages:
        for step_id, why in stale_steps(steps, store.record, ages, time.time()).items():
            forced.setdefault(step_id, why)
    return forced


def execute(planned: Planned, reporter: Reporter) -> None:
    """Run the steps the plan says must run, recording each once it is complete."""
    store = planned.store
    ex = planned.executor
    by_id = {s.id: s for s in planned.steps}
    if planned.remote is not None:  # download what the plan takes from a remote cache
        try:
            planned.decisions = _materialize(planned, planned.remote)
        finally:
            planned.remote.report_ignored()
    reporter.planned(planned.decisions)
    ran: set[str] = set()
    lock: FileLock | None = None
    kept: list[str] = []
    running: Step | None = None  # the step an interrupt stops
    t0 = time.monotonic()
    if any(d.action is Action.RUN and d.step.kind in ENGINE_STEPS for d in planned.decisions):
        remove_abandoned(ex.engine)
    if any(d.action is Action.RUN for d in planned.decisions):
        # What killed builds left on disk: scratch directories, half-written images.
        remove_orphans(Path(tempfile.gettempdir()), SCRATCH_PREFIX)
        remove_orphans(ex.output.parent, f".{ex.output.name}.rfs-tmp-")
        store.remove_parts()
    try:
        # The package files the steps to run will use are copied now, while they are still
        # what the keys were computed from (a step checks its copies either way).
        if ex.snapshot is not None:
            ex.snapshot.take(_refs_to_run(planned))
        if planned.dockerfile is not None and planned.dockerfile.fresh:
            reporter.message(
                f"  building the base from {planned.script.container.dockerfile} again: --no-cache"
            )
            _rebuild_dockerfile_base(planned, planned.dockerfile)
        for d in planned.decisions:
            if d.action is Action.CACHED:
                store.touch(d.step.key)
            if d.action is not Action.RUN:
                # What the step took when it ran: the time the cache saves now.
                recorded = (store.record(d.step.key) or {}).get("seconds")
                reporter.reused(d.step, d.action, recorded)
                continue
            # One process builds a step; another that needs it waits, then reuses it.
            lock = store.build_lock(
                d.step.key,
                on_wait=functools.partial(
                    reporter.message, f"  waiting  {d.step.id:<10} another rfs build is making it"
                ),
            )
            if not d.forced and ex.missing(d.step) is None:
                lock.release()
                reporter.reused(d.step, Action.CACHED, None)
                continue
            reporter.started(d.step, d.reason)
            running, t0 = d.step, time.monotonic()
            try:
                record = ex.run(d.step, by_id, planned.facts.base_id)
            except RfsError as exc:
                if signals.received() is not None:
                    # Ctrl-C reaches the whole process group: a tool rfs runs (mke2fs) may die
                    # of it first, and its failure is the interrupt's doing.
                    raise KeyboardInterrupt from exc
                reporter.failed(d.step, time.monotonic() - t0, exc.message)
                if isinstance(exc, StepFailed) and exc.container:
                    kept.append(exc.container)  # --keep-failed: the user will inspect it
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
            running = None
            lock.release()
            ran.add(d.step.key)
            reporter.finished(
                d.step,
                seconds,
                artifact_size(d.step, record, ex.output),
                detail=str(record.get("route", "")),
            )
    except KeyboardInterrupt:  # SIGINT, or SIGTERM turned into it by rfs.host.signals
        if running is not None:
            reporter.failed(running, time.monotonic() - t0, "interrupted")
        raise _interrupted(running, len(ran)) from None
    finally:
        if lock is not None:
            lock.release()
        if ex.snapshot is not None:
            ex.snapshot.close()
        _remove_containers(ex, kept)
        if planned.remote is not None:
            _upload(planned.remote, planned, ran)
    manifests: dict[str, object] = {
        s.id: {**manifest(s), **remembered_text(planned.script, s)} for s in planned.steps
    }
    manifests["_output"] = str(ex.output)
    store.save_manifests(planned.script_id, manifests)
    store.evict(keep={s.key for s in planned.steps})


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


def _interrupted(step: Step | None, finished: int) -> Interrupted:
    """The one-line summary of an interrupted build."""
    signum = signals.received()
    how = f"interrupted by {signals.name(signum)}" if signum is not None else "interrupted"
    where = f" during {step.id}" if step is not None else ""
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
    import sys

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
