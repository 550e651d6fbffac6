"""Load, compile, plan and execute a build: the flow from build script to image file."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rfs.graph.compiler import compile_steps
from rfs.graph.inputs import DIGEST_MEMO, digest_refs, package_refs, source_date_epoch
from rfs.graph.planner import Availability, plan_steps, stale_steps, staleness
from rfs.graph.steps import Facts, Step, StepKind
from rfs.host.hashing import digest_bytes
from rfs.pipeline.dockerfilebase import (
    context_digests,
    context_entries_of,
    context_refs,
    dockerfile_base,
    dockerfile_from_images,
    record_dockerfile_base,
)
from rfs.pipeline.execution import Job, execute, execute_all, remove_abandoned
from rfs.pipeline.execution import _labels as _labels
from rfs.pipeline.execution import _owner as _owner
from rfs.pipeline.model import KEEP_LABEL, OWNER_LABEL, RUN_LABEL, Options, Planned
from rfs.pipeline.platformcheck import check_emulation, check_platform
from rfs.report.reporter import Reporter
from rfs.run.basefacts import engine_facts, quick_engine_facts
from rfs.run.executors import Executor
from rfs.run.snapshot import PackageSnapshot
from rfs.run.store import Store
from rfs.script.model import BuildScript
from rfs.script.package import load

if TYPE_CHECKING:
    from rfs.engine.base import Engine
    from rfs.remote.sync import RemoteCache

__all__ = [
    "KEEP_LABEL",
    "OWNER_LABEL",
    "RUN_LABEL",
    "Job",
    "Options",
    "Planned",
    "connect_engine",
    "execute",
    "execute_all",
    "forced_steps",
    "image_name",
    "max_ages",
    "prepare",
    "remove_abandoned",
]

log = logging.getLogger("rfs.pipeline.build")


def connect_engine(script: BuildScript) -> Engine:
    """Connect to the engine the script asks for."""
    from rfs.engine import connect

    c = script.container
    return connect(c.engine.value, c.connection_uri)


def prepare(
    opts: Options,
    reporter: Reporter,
    engine_factory: Callable[[BuildScript], Engine] = connect_engine,
    store: Store | None = None,
) -> Planned:
    """Load the package, gather facts, compile the graph and plan each step. Packages built
    together share one `store`."""
    loaded = load(opts.package)
    if opts.platform is not None:
        from rfs.script.platform import with_platform

        loaded = dataclasses.replace(loaded, script=with_platform(loaded.script, opts.platform))
    script = loaded.script
    check_emulation(script)
    store = store or Store(opts.cache_dir, opts.cache_size)
    # CI can name the run (its job id, say) so leftover containers are attributable.
    run_id = opts.run_id or os.environ.get("RFS_RUN_ID") or uuid.uuid4().hex[:12]
    # Connected on first use: a build whose image is up to date never needs the docker SDK.
    engine = functools.cache(lambda: engine_factory(script))
    memo = store.meta(DIGEST_MEMO)
    remembered = dict(memo)  # entries are replaced, never changed in place
    # An archive package is unpacked to a new directory each run: its paths are not worth
    # remembering.
    entries = context_entries_of(script)
    refs = package_refs(script) + context_refs(entries)
    digests = digest_refs(
        script.package_root, sorted(set(refs)), memo if script.origin is None else None
    )
    if memo != remembered:
        store.set_meta(DIGEST_MEMO, memo)
    # Times 0, as copy-in's: SOURCE_DATE_EPOCH is in no command's key, so what commands see
    # must not depend on it.
    snapshot = PackageSnapshot(script.package_root, digests, mtime=0)
    try:
        # The socket shortcut is for the engine `connect_engine` would reach; an engine handed in
        # (a fake one, in tests) answers for itself.
        from rfs.fs.tools import remembered_tool_version
        from rfs.graph.codeversion import code_version

        code = {kind: code_version(kind) for kind in ("run", "export", "diff", "assemble")}
        quick = not opts.pull and engine_factory is connect_engine
        from_images = dockerfile_from_images(script, engine, quick=quick, pull=opts.pull)
        built = dockerfile_base(
            script, digests, entries, code, store, from_images, fresh=opts.no_cache
        )
        found = quick_engine_facts(script, digests, built) if quick else None
        if found is None:
            found = engine_facts(engine(), script, digests, snapshot, pull=opts.pull, built=built)
        if built is not None:
            record_dockerfile_base(store, built, found.base_id, script.container.engine.value)
        check_platform(script, found.platform)

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
            context=context_digests(entries, digests),
            from_images=from_images,
        )
        steps = compile_steps(script, facts)
        script_file = script.origin or (
            (script.package_root or opts.package.resolve().parent) / script.script_file.name
        )
        script_id = digest_bytes(str(script_file.resolve()).encode())
        previous = store.last_manifests(script_id)
        if opts.output is None and opts.output_dir is not None:
            name = image_name(opts.package)
            output = opts.output_dir / f"{name}.{script.filesystem.type.value}"
        else:
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
    except BaseException:
        snapshot.close()  # the copies a Dockerfile base read: nothing is left behind
        raise


def release_snapshots(planned: Iterable[Planned]) -> None:
    """Delete the package copies planning took (a Dockerfile base is built from them) for
    plans that are not executed, or whose execution stopped before its own clean-up."""
    for one in planned:
        if one.executor.snapshot is not None:
            one.executor.snapshot.close()


def image_name(package: Path) -> str:
    """The name of a package's image in an output directory: the package directory's name,
    or the script (or archive) file's stem."""
    path = package.resolve()
    return path.name if path.is_dir() else path.name.split(".", 1)[0]


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
