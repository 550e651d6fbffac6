"""Decide, for every step, whether it is cached, must run, or is not needed, and why.

Planning is demand-driven from the final image backwards: a step runs only when its result is
missing and something that must run needs it. So a cached image needs nothing upstream, and a
missing export resumes from the deepest layer still present. Pure: availability and the last
build's manifests are passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rfs.graph.steps import Step, StepKind

if TYPE_CHECKING:
    import networkx as nx


class Action(enum.Enum):
    """What the build does with a step."""

    CACHED = "cached"
    RUN = "run"
    SKIP = "skip"  # not needed: everything downstream is cached


@dataclass(frozen=True)
class Decision:
    """A step, what happens to it, and why."""

    step: Step
    action: Action
    reason: str
    forced: bool = False  # runs whatever is cached (--no-cache, --rebuild, stale, no_cache)


Availability = Callable[[Step], str | None]  # None: available; else why not


def manifest(step: Step) -> dict[str, Any]:
    """What is remembered of a step to explain the next build's decisions."""
    return {
        "key": step.key,
        "inputs": dict(step.inputs),
        "label": step.label,
        "context": dict(step.context),
    }


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:20] + "…"


def diff_inputs(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human descriptions of what differs between two manifests."""
    changes = []
    for name in sorted(set(old) | set(new)):
        where = f"{prefix}{name}"
        if name not in old:
            changes.append(f"{where} added")
        elif name not in new:
            changes.append(f"{where} removed")
        elif old[name] != new[name]:
            a, b = old[name], new[name]
            if isinstance(a, dict) and isinstance(b, dict):
                changes.extend(diff_inputs(a, b, where + "."))
            elif (
                isinstance(a, list)
                and isinstance(b, list)
                and len(a) == len(b)
                and all(
                    isinstance(x, dict) and isinstance(y, dict) for x, y in zip(a, b, strict=True)
                )
            ):
                for i, (x, y) in enumerate(zip(a, b, strict=True)):
                    changes.extend(diff_inputs(x, y, f"{where}[{i}]."))
            elif isinstance(a, str | int | None) and isinstance(b, str | int | None):
                changes.append(f"{where} changed ({_short(a)} → {_short(b)})")
            else:
                changes.append(f"{where} changed")
    return changes


def _own_changes(step: Step, old: Mapping[str, Any]) -> list[str]:
    if "image_id" in step.inputs:  # the base: say which tag moved, or which tag replaced it
        was, now = old.get("context", {}).get("image"), step.context.get("image")
        old_id, new_id = old.get("inputs", {}).get("image_id"), step.inputs["image_id"]
        if old_id == new_id:
            return []
        ids = f"{_short(old_id)} → {_short(new_id)}"
        if was == now:
            return [f"image {now} now resolves to a different ID ({ids})"]
        return [f"image changed from {was} to {now} ({ids})"]
    return diff_inputs(old.get("inputs", {}), dict(step.inputs))


def explain(
    step: Step,
    previous: Mapping[str, Any],
    keys: Mapping[str, str],
    steps: Mapping[str, Step] | None = None,
) -> str:
    """Why `step` differs from the last build of the same script, if it does."""
    old = previous.get(step.id)
    if not isinstance(old, dict):
        return "never built"
    if old.get("key") == step.key:
        return ""
    changes = _own_changes(step, old)
    if changes:
        return "; ".join(changes)
    changed = [
        p
        for p in step.parents
        if isinstance(previous.get(p), dict) and previous[p].get("key") != keys[p]
    ]
    if changed:
        parts = []
        for parent in changed:
            own = _own_changes(steps[parent], previous[parent]) if steps else []
            parts.append(f"{parent} changed" + (f" ({'; '.join(own)})" if own else ""))
        return ", ".join(parts)
    return "inputs changed"


def forced_closure(steps: Sequence[Step], forced: Mapping[str, str]) -> dict[str, str]:
    """`forced` (step id -> why it must run) with every step after a forced one added: a step
    made again may give other bytes (`apt-get update`), and what was made from the old result
    must not be reused with the new one. `steps` in dependency order."""
    closure = dict(forced)
    for step in steps:
        if step.id in closure:
            continue
        for parent in step.parents:
            if parent in closure:
                closure[step.id] = f"{parent} runs again ({closure[parent]})"
                break
    return closure


def plan_steps(
    steps: Sequence[Step],
    available: Availability,
    previous: Mapping[str, Any] | None = None,
    forced: Mapping[str, str] | None = None,
) -> list[Decision]:
    """Decide every step; `steps` must be in dependency order (as `compile_steps` gives them),
    and the decisions come in that order.

    Demand-driven, from the final steps back: a step is needed if it is final or a needed step
    that must run depends on it; a needed step runs unless `available` says it is cached.
    `forced` (step id -> reason) steps, and every step after them, run whatever is cached
    (`rfs build --no-cache`, `--rebuild`, stale or always-run commands).
    This is the same walk as `plan` over the graph, done on the list so a build does not
    import networkx (0.1-0.2 s) to answer.
    """
    previous = previous or {}
    by_id = {s.id: s for s in steps}
    keys = {s.id: s.key for s in steps}
    must = forced_closure(steps, forced or {})
    needed = {s.id for s in steps} - {p for s in steps for p in s.parents}
    decided: dict[str, Decision] = {}
    for step in reversed(steps):
        if step.id not in needed:
            decided[step.id] = Decision(step, Action.SKIP, "not needed: later steps are cached")
            continue
        if step.id in must:
            decided[step.id] = Decision(step, Action.RUN, must[step.id], forced=True)
            needed.update(step.parents)
            continue
        missing = available(step)
        if missing is None:
            decided[step.id] = Decision(step, Action.CACHED, "cached")
            continue
        why = explain(step, previous, keys, by_id)
        # A cache copy too old for a command's max_age says more than "never built".
        decided[step.id] = Decision(
            step, Action.RUN, missing if missing.startswith("stale:") else why or missing
        )
        needed.update(step.parents)
    return [decided[s.id] for s in steps]


def plan(
    graph: nx.DiGraph,
    available: Availability,
    previous: Mapping[str, Any] | None = None,
    forced: Mapping[str, str] | None = None,
) -> list[Decision]:
    """Decide every step of `graph` (see `plan_steps`); the result is in dependency order."""
    import networkx as nx

    # Ties are broken by insertion order, so overlays are prepared right before assembly.
    position = {node: i for i, node in enumerate(graph.nodes)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    return plan_steps([graph.nodes[n]["step"] for n in order], available, previous, forced)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def staleness(
    steps: Sequence[Step], max_age: Mapping[str, int], now: float
) -> Callable[[Step, Mapping[str, Any]], str | None]:
    """A check of one step's record against the `max_age` (step id -> seconds) of its own
    command and of every command it was made from: None if fresh, else why it is stale.

    A record says when it was made (`created`) and, in `made_at`, when each command result it
    was made from was made (key -> time); a record without that time for such a result is
    stale (it predates the bookkeeping). `steps` in dependency order. Used on local records
    (`stale_steps`) and on remote ones before they are downloaded.
    """
    by_id = {s.id: s for s in steps}
    ancestors: dict[str, set[str]] = {}
    for step in steps:
        ancestors[step.id] = set().union(*(ancestors[p] | {p} for p in step.parents))

    def check(step: Step, found: Mapping[str, Any]) -> str | None:
        limit = max_age.get(step.id)
        created = found.get("created")
        if limit is not None:
            if not isinstance(created, int | float):
                return "stale: made at an unknown time"
            if now - created > limit:
                return f"stale: made {_age(now - created)} ago, max_age is {_age(limit)}"
        made_at = found.get("made_at")
        made_at = made_at if isinstance(made_at, Mapping) else {}
        for ancestor in sorted(a for a in ancestors.get(step.id, ()) if a in max_age):
            when = made_at.get(by_id[ancestor].key)
            if not isinstance(when, int | float):
                return f"stale: made from a result of {ancestor} of unknown age"
            if now - when > max_age[ancestor]:
                return (
                    f"stale: made from a result of {ancestor} made "
                    f"{_age(now - when)} ago, max_age is {_age(max_age[ancestor])}"
                )
        return None

    return check


def stale_steps(
    steps: Sequence[Step],
    record: Callable[[str], Mapping[str, Any] | None],
    max_age: Mapping[str, int],
    now: float,
) -> dict[str, str]:
    """The cached steps whose result is, or was made from, a result older than the `max_age`
    of its command (see `staleness`): step id -> why it must be made again."""
    check = staleness(steps, max_age, now)
    stale: dict[str, str] = {}
    for step in steps:
        found = record(step.key)
        if found is not None and (why := check(step, found)) is not None:
            stale[step.id] = why
    return stale


def made_at(
    step: Step, record: Callable[[str], Mapping[str, Any] | None], by_id: Mapping[str, Step]
) -> dict[str, float]:
    """When each command result that `step` is made from was made (key -> time), from its
    parents' records: kept in `step`'s record, so `stale_steps` can tell its age even for a
    `max_age` added after it was made."""
    found: dict[str, float] = {}
    for parent_id in step.parents:
        parent = by_id[parent_id]
        parent_record = record(parent.key) or {}
        inherited = parent_record.get("made_at")
        if isinstance(inherited, Mapping):
            found.update(
                {str(k): float(v) for k, v in inherited.items() if isinstance(v, int | float)}
            )
        if parent.kind is StepKind.RUN and isinstance(parent_record.get("created"), int | float):
            found[parent.key] = float(parent_record["created"])
    return found


@dataclass(frozen=True)
class Shared:
    """One node of the union of several packages' plans: a step key, and every package's
    decision for it (`rfs build PKG...` runs the step once, for all of them)."""

    key: str
    members: tuple[tuple[str, Decision], ...]  # (package name, its decision), in plan order

    @property
    def action(self) -> Action:
        """What the union does with the step: runs it if any package must, else reuses it."""
        actions = {d.action for _, d in self.members}
        for action in (Action.RUN, Action.CACHED):
            if action in actions:
                return action
        return Action.SKIP

    @property
    def name(self) -> str:
        """`<package>/<step>` of the first package that has it."""
        package, d = self.members[0]
        return f"{package}/{d.step.id}"


def union(plans: Sequence[tuple[str, Sequence[Decision]]]) -> dict[str, Shared]:
    """The plans of several packages (name, decisions) as one graph: step key -> `Shared`, in
    the order the plans list them, so the first package's steps come first. Edges are the
    members' parents' keys; two packages' steps of the same key are one node."""
    members: dict[str, list[tuple[str, Decision]]] = {}
    for name, decisions in plans:
        for d in decisions:
            members.setdefault(d.step.key, []).append((name, d))
    return {key: Shared(key, tuple(found)) for key, found in members.items()}


def union_edges(plans: Sequence[tuple[str, Sequence[Decision]]]) -> list[tuple[str, str]]:
    """The (parent key, child key) edges of the union of `plans` (see `union`), each once."""
    edges: dict[tuple[str, str], None] = {}
    for _, decisions in plans:
        keys = {d.step.id: d.step.key for d in decisions}
        for d in decisions:
            for parent in d.step.parents:
                edges[(keys[parent], d.step.key)] = None
    return list(edges)
