"""`rfs graph`: the step graph as a picture, each node with its state and last timing.

    rfs graph examples/busybox                      # Graphviz DOT on stdout
    rfs graph examples/busybox --format svg -o build.svg
    rfs graph examples/busybox --format png -o build.png
    rfs graph images/web images/db                  # several packages: one graph

Nodes are the steps (base, one per command, export, overlays, assemble), coloured by what the
next build would do with them: cached (green), to run (orange, with the reason) or not needed
(grey). Each shows how long it took when it last ran. svg and png are drawn by Graphviz's `dot`
(Debian package graphviz). With several packages the graph is their union: a step they share
(one key) is one node, named after the first package that has it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.commands import add_cache_options, add_force_options, add_packages, build_options
from rfs.errors import EXIT_OK, EnvironmentProblem, UsageError

if TYPE_CHECKING:
    from rfs.graph.planner import Decision
    from rfs.run.store import Store

FORMATS = ("dot", "svg", "png")
_FILL = {"cached": "#c8e6c9", "run": "#ffe0b2", "skip": "#eeeeee"}
_STATE = {"cached": "cached", "run": "to run", "skip": "not needed"}


def register(sub: Any) -> None:
    """Add the `graph` parser."""
    p = sub.add_parser("graph", help="draw the step graph with each step's state and timing")
    add_packages(p)
    add_cache_options(p)
    add_force_options(p)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="dot",
        help="dot (Graphviz source, the default), svg or png (drawn by `dot`)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="file to write (default: stdout; png needs a file or a pipe)",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="the image file the build would write (default: the last one), which "
        "decides whether assembly is cached",
    )
    p.set_defaults(func=run)


def _quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def last_seconds(decision: Decision, store: Store, previous: Mapping[str, Any]) -> float | None:
    """How long the step took when it last ran: its own record when it is cached, else the
    record of the key it had in the last build of this script."""
    record = store.record(decision.step.key)
    if record is None or "seconds" not in record:
        before = previous.get(decision.step.id)
        old_key = before.get("key") if isinstance(before, dict) else None
        record = store.record(str(old_key)) if old_key else None
    if record is None or "seconds" not in record:
        return None
    return float(record["seconds"])


def to_dot(
    decisions: list[Decision],
    edges: Iterable[tuple[str, str]],
    timings: Mapping[str, float | None],
    title: str = "",
    why: Mapping[str, str] | None = None,
) -> str:
    """The Graphviz source of the plan: one node per step, one edge per dependency (`edges`,
    from the step graph: dependency first)."""
    from rfs.report.reporter import format_seconds

    lines = [
        "digraph rfs {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, labelloc=t'
        + (f", label={_quote(title)}" if title else "")
        + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#777777"];',
    ]
    for d in decisions:
        action = d.action.value
        parts = [d.step.id, _clip(d.step.label), _STATE[action]]
        seconds = timings.get(d.step.id)
        if seconds is not None:
            parts[-1] += f" · last {format_seconds(seconds)}"
        if action == "run":
            parts.append(_clip(f"why: {(why or {}).get(d.step.id) or d.reason}"))
        lines.append(
            f"  {_quote(d.step.id)} [label={_quote(chr(10).join(parts))}, "
            f"fillcolor={_quote(_FILL[action])}];"
        )
    for parent, child in edges:
        lines.append(f"  {_quote(parent)} -> {_quote(child)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot: str, fmt: str) -> bytes:
    """`dot` source rendered by Graphviz as `fmt` (svg or png)."""
    from rfs.host import proc

    try:
        tool = proc.tool_path("dot")
    except EnvironmentProblem as exc:
        raise EnvironmentProblem(
            f"drawing {fmt} needs Graphviz's `dot`, which is not installed",
            hint="apt-get install graphviz, or use --format dot and draw it elsewhere",
        ) from exc
    return proc.run([tool, f"-T{fmt}"], input_bytes=dot.encode(), what="dot").stdout


def run(args: argparse.Namespace) -> int:
    """Print or write the graph."""
    from rfs.graph.explain import explain_plan
    from rfs.pipeline.build import prepare, release_snapshots
    from rfs.report.reporter import Reporter

    if args.format == "png" and args.output is None and sys.stdout.isatty():
        raise UsageError("a PNG would garble the terminal: pass -o FILE or pipe it")
    if len(args.package) > 1:
        return write(args, union_dot(args), args.format)
    args.package = args.package[0]
    opts = build_options(args, args.image)
    planned = prepare(opts, Reporter())
    try:
        previous = planned.store.last_manifests(planned.script_id)
        timings = {d.step.id: last_seconds(d, planned.store, previous) for d in planned.decisions}
        # The first precise difference (as `plan --explain` words it), without the step name.
        why = {
            step: changes[0].split(": ", 1)[-1]
            for step, changes in explain_plan(planned.decisions, previous, planned.script).items()
            if changes
        }
    finally:
        release_snapshots([planned])
        planned.store.close()
    dot = to_dot(planned.decisions, planned.graph.edges, timings, title=str(args.package), why=why)
    return write(args, dot, args.format)


def write(args: argparse.Namespace, dot: str, fmt: str) -> int:
    """Write `dot`, drawn as `fmt`, where the arguments say."""
    data = dot.encode() if fmt == "dot" else render(dot, fmt)
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            args.output.write_bytes(data)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot write {args.output}: {exc.strerror}") from exc
    return EXIT_OK


def union_dot(args: argparse.Namespace) -> str:
    """The DOT source of several packages' plans as one graph (see the module docstring)."""
    import dataclasses

    from rfs.commands import prepare_packages
    from rfs.graph.explain import explain_plan
    from rfs.graph.planner import union, union_edges
    from rfs.pipeline.build import release_snapshots
    from rfs.report.reporter import Reporter

    if args.image is not None:
        raise UsageError("--image names one package's image; it does not go with several")
    store, planned = prepare_packages(args, None, lambda name: Reporter())
    try:
        plans = [(name, one.decisions) for name, one in planned]
        nodes = union(plans)
        decisions: list[Decision] = []
        timings: dict[str, float | None] = {}
        why: dict[str, str] = {}
        for name, one in planned:
            previous = store.last_manifests(one.script_id)
            changes = explain_plan(one.decisions, previous, one.script)
            for d in one.decisions:
                node = nodes[d.step.key]
                if node.members[0][1] is not d:
                    continue  # drawn once, as the first package's
                others = sorted({n for n, _ in node.members[1:] if n != name})
                label = d.step.label + (f" (also {', '.join(others)})" if others else "")
                step = dataclasses.replace(d.step, id=node.name, label=label)
                decisions.append(dataclasses.replace(d, step=step, action=node.action))
                timings[node.name] = last_seconds(d, store, previous)
                if changes.get(d.step.id):
                    why[node.name] = changes[d.step.id][0].split(": ", 1)[-1]
    finally:
        release_snapshots(one for _, one in planned)
        store.close()
    edges = [(nodes[a].name, nodes[b].name) for a, b in union_edges(plans)]
    title = " + ".join(name for name, _ in planned)
    return to_dot(decisions, edges, timings, title=title, why=why)
