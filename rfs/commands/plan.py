"""`rfs plan`: every step with its key, cached or to run, and why."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rfs.commands import add_cache_options, add_force_options, add_packages, build_options
from rfs.errors import EXIT_OK


def register(sub: Any) -> None:
    """Add the `plan` parser."""
    p = sub.add_parser("plan", help="show each step: cached or to run, and why")
    add_packages(p)
    add_cache_options(p)
    add_force_options(p)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="the image file the build would write (default: the last one)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="the directory a build of several packages would write to",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="for each step that will run, list every input that differs from the "
        "last build of this script",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the plan as one JSON event (docs/events.md), with the explanations",
    )
    from rfs.remote.config import add_remote_options

    add_remote_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plan (of every package, as one graph, when there are several)."""
    if len(args.package) > 1 or args.output_dir is not None:
        if args.output is not None:
            from rfs.errors import UsageError

            raise UsageError("give either -o/--output FILE or --output-dir DIR, not both")
        return run_many(args)
    args.package = args.package[0]
    return run_one(args)


def run_one(args: argparse.Namespace) -> int:
    """Print the plan of one package."""
    from rfs.graph.explain import explain_plan
    from rfs.graph.planner import Action
    from rfs.pipeline.build import prepare, release_snapshots
    from rfs.remote.config import remote_settings
    from rfs.report.reporter import Reporter

    opts = build_options(args, args.output)
    opts.remote = remote_settings(args)  # a build would look there too: so does its plan
    planned = prepare(opts, Reporter())
    try:
        for warning in planned.loaded.warnings:
            print(f"rfs: warning: {warning}", file=sys.stderr)
        changes: dict[str, list[str]] = {}
        if args.explain or args.json:
            previous = planned.store.last_manifests(planned.script_id)
            changes = explain_plan(planned.decisions, previous, planned.script)
        if args.json:
            from rfs.report.events import JsonReporter, plan_steps

            JsonReporter(sys.stdout).emit("plan", steps=plan_steps(planned.decisions, changes))
            return EXIT_OK
        # Steps the plan counts as cached only because a remote cache has them (looked up
        # while planning, nothing downloaded): a build downloads them.
        remote = planned.remote.found if planned.remote is not None else {}
        fetched = 0
        for d in planned.decisions:
            print(f"{d.action.value:<7} {d.step.id:<10} {d.step.key[:12]}  {d.step.label}")
            if d.action is Action.RUN:
                print(f"{'':30}why: {d.reason}")
            elif d.action is Action.CACHED and d.step.key in remote:
                print(f"{'':30}from: {remote[d.step.key][0].url}")
                fetched += 1
            for change in changes.get(d.step.id, []):  # the base is explained when it moved
                print(f"{'':30}  - {change}")
        n = len(planned.to_run())
        if fetched:
            print(f"{n} step(s) to run, {fetched} to download from a remote cache")
        else:
            print(f"{n} step(s) to run" if n else "nothing to do: the image is up to date")
    finally:
        if planned.remote is not None:  # says which remote copies were misses, and why
            planned.remote.close()
        release_snapshots([planned])
        planned.store.close()
    return EXIT_OK


def run_many(args: argparse.Namespace) -> int:
    """Print the plan of several packages as one graph: a step two packages share (one key)
    is listed under each, and counted, and run, once."""
    from rfs.commands import prepare_packages
    from rfs.graph.explain import explain_plan
    from rfs.graph.planner import Action, union
    from rfs.pipeline.build import release_snapshots
    from rfs.report.packages import PackageReporter
    from rfs.report.reporter import Reporter

    store, planned = prepare_packages(args, args.output_dir, lambda name: Reporter())
    try:
        changes = {
            name: explain_plan(one.decisions, store.last_manifests(one.script_id), one.script)
            if args.explain or args.json
            else {}
            for name, one in planned
        }
        if args.json:
            from rfs.report.events import JsonReporter, plan_steps

            out = JsonReporter(sys.stdout)
            for name, one in planned:
                shown = PackageReporter(Reporter(), name)
                decisions = [
                    type(d)(shown.renamed(d.step), d.action, d.reason, d.forced)
                    for d in one.decisions
                ]
                renamed = {f"{name}/{step}": why for step, why in changes[name].items()}
                out.emit("plan", steps=plan_steps(decisions, renamed))
            return EXIT_OK
        nodes = union([(name, one.decisions) for name, one in planned])
        for name, one in planned:
            print(f"{name}: {one.executor.output}" if args.output_dir else f"{name}:")
            for d in one.decisions:
                node = nodes[d.step.key]
                first = node.members[0][1] is d
                print(f"  {d.action.value:<7} {d.step.id:<10} {d.step.key[:12]}  {d.step.label}")
                if d.action is Action.RUN and first:
                    print(f"{'':32}why: {d.reason}")
                elif d.action is Action.RUN:
                    print(f"{'':32}shared: runs once, as {node.name}")
                for change in changes[name].get(d.step.id, []):
                    print(f"{'':32}  - {change}")
        n = sum(node.action is Action.RUN for node in nodes.values())
        shared = sum(node.action is Action.RUN and len(node.members) > 1 for node in nodes.values())
        total = f"{n} step(s) to run for {len(planned)} images"
        print(f"{total} ({shared} shared)" if shared else total)
    finally:
        for _, one in planned:
            if one.remote is not None:
                one.remote.close()
        release_snapshots(one for _, one in planned)
        store.close()
    return EXIT_OK
