"""`rfs plan --explain`: for each step that will run, exactly which inputs differ from the last
build of the same script, in the build script's own terms.

    commands[1]: script changed (line 4: `apt-get install -y curl`)
    base: image debian:bookworm-slim now resolves to a different ID (sha256:… → sha256:…)
    overlays: /etc/resolv.conf content changed
    filesystem.size_mib changed (64 → 128)

The step manifests the last build saved (`planner.manifest`) hold each step's inputs; for
scripts the build also saves a hash per line (`remembered_text`), so a changed script can be
pinned to its lines without keeping its text in the cache. Overlays, volumes and mounted
overlays are matched by destination, not by position, so inserting one names only that one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from rfs.graph.planner import Action, Decision, _own_changes, _short, diff_inputs
from rfs.graph.steps import Step, StepKind
from rfs.host.hashing import digest_bytes
from rfs.script.model import BuildScript

_LINE_HASH_CHARS = 16  # 64 bits: a collision would only hide which line changed
_MAX_HUNKS = 4

# Assemble inputs, as the build script names them.
_ASSEMBLE_FIELDS = {
    "type": "filesystem.type",
    "size_mib": "filesystem.size_mib",
    "block_size_mib": "filesystem.block_size_mib",
    "dd_args": "filesystem.dd_args",
    "mkfs_args": "filesystem.mkfs_args",
    "export": "export",
    "mkfs": "the mke2fs version",
    "assembly": "rfs's assembly format",
    "source_date_epoch": "SOURCE_DATE_EPOCH",
}


def field_name(step: Step) -> str:
    """How a step is named in the build script: `commands[1]`, `overlays`, `base`…"""
    if step.kind is StepKind.RUN and step.index is not None:
        return f"commands[{step.index}]"
    return step.id


def script_text(script: BuildScript, step: Step) -> bytes | None:
    """The text of the script a RUN step runs (inline or a package file), or of the
    Dockerfile a base is built from, if it has one."""
    if step.kind is StepKind.BASE and script.container.dockerfile is not None:
        if script.package_root is None:
            return None
        from rfs.script.package import resolve_reference

        try:
            return resolve_reference(script.package_root, script.container.dockerfile).read_bytes()
        except (OSError, ValueError):
            return None
    if step.kind is not StepKind.RUN or step.index is None:
        return None
    cmd = script.commands[step.index]
    if cmd.script_inline is not None:
        return cmd.script_inline.encode()
    if cmd.script_path is None or script.package_root is None:
        return None
    from rfs.script.package import resolve_reference

    try:
        return resolve_reference(script.package_root, cmd.script_path).read_bytes()
    except (OSError, ValueError):
        return None


def line_hashes(text: bytes) -> list[str]:
    """A short hash of each line of `text`."""
    return [digest_bytes(line)[:_LINE_HASH_CHARS] for line in text.split(b"\n")]


def remembered_text(script: BuildScript, step: Step) -> dict[str, Any]:
    """What the build saves beside a step's manifest so the next plan can name changed lines."""
    text = script_text(script, step)
    return {} if text is None else {"lines": line_hashes(text)}


def _span(a: int, b: int) -> str:
    return f"line {a}" if b == a else f"lines {a}-{b}"


def line_changes(old: Sequence[str], new: Sequence[str], new_text: bytes | None = None) -> str:
    """Which lines differ, e.g. "line 4: `apt-get install curl`", "lines 2-3, line 9 added"."""
    new_lines = new_text.split(b"\n") if new_text is not None else []
    hunks = []
    opcodes = difflib.SequenceMatcher(None, list(old), list(new), autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            continue
        if tag == "delete":
            hunks.append(f"{_span(i1 + 1, i2)} removed")
            continue
        text = _span(j1 + 1, j2) + (" added" if tag == "insert" else "")
        if j2 - j1 == 1 and j1 < len(new_lines):
            line = new_lines[j1].decode("utf-8", "replace").strip()
            if line:
                text += f": `{line if len(line) <= 60 else line[:57] + '...'}`"
        hunks.append(text)
    if len(hunks) > _MAX_HUNKS:
        hunks = [*hunks[:_MAX_HUNKS], f"{len(hunks) - _MAX_HUNKS} more"]
    return ", ".join(hunks)


def _by_destination(items: Any, key: str) -> dict[str, Any]:
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, list):
        return {str(i.get(key)): i for i in items if isinstance(i, dict)}
    return {}


def _keyed_changes(old: Any, new: Any, what: str, key: str = "destination") -> list[str]:
    """Changes between two collections keyed by destination (a list of dicts, or a dict)."""
    a, b = _by_destination(old, key), _by_destination(new, key)
    out = []
    for dest in sorted(set(a) | set(b)):
        where = f"{what} {dest}".strip()
        if dest not in a:
            out.append(f"{where} added")
        elif dest not in b:
            out.append(f"{where} removed")
        elif a[dest] != b[dest]:
            x, y = a[dest], b[dest]
            if not (isinstance(x, dict) and isinstance(y, dict)):
                out.append(f"{where} content changed")
                continue
            for name in sorted(set(x) | set(y)):
                if name == key or x.get(name) == y.get(name):
                    continue
                if name == "content":
                    out.append(f"{where} content changed")
                elif name == "mode":
                    out.append(
                        f"{where} mode changed ({_mode(x.get(name))} → {_mode(y.get(name))})"
                    )
                else:
                    out.append(f"{where} {name} changed ({x.get(name)} → {y.get(name)})")
    return out


def _mode(value: Any) -> str:
    return oct(value) if isinstance(value, int) else "default"


def _run_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], old_lines: Any, new_text: bytes | None
) -> list[str]:
    out = []
    rest_old, rest_new = dict(old), dict(new)
    for name in ("script", "script_path", "argv", "mounted_overlays", "volumes"):
        rest_old.pop(name, None)
        rest_new.pop(name, None)
    if ("argv" in old) != ("argv" in new):
        out.append(
            "changed from a command to a script"
            if "argv" in old
            else "changed from a script to a command"
        )
    elif "argv" in new and old.get("argv") != new.get("argv"):
        out.append(
            f"command changed (`{' '.join(map(str, old.get('argv') or []))}` → "
            f"`{' '.join(map(str, new.get('argv') or []))}`)"
        )
    if "script_path" in old and "script_path" in new and old["script_path"] != new["script_path"]:
        out.append(f"script_path changed ({old['script_path']} → {new['script_path']})")
    if "script" in old and "script" in new and old["script"] != new["script"]:
        where = ""
        if isinstance(old_lines, list) and new_text is not None:
            where = line_changes(old_lines, line_hashes(new_text), new_text)
        out.append(f"script changed ({where})" if where else "script changed")
    out += _keyed_changes(
        old.get("mounted_overlays"), new.get("mounted_overlays"), "mounted overlay"
    )
    out += _keyed_changes(old.get("volumes"), new.get("volumes"), "volume")
    out += diff_inputs(rest_old, rest_new)
    return out


def _assemble_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        label = _ASSEMBLE_FIELDS.get(name, name)
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{label}.{c}" for c in diff_inputs(a, b)]
        elif isinstance(a, list | str | int) or isinstance(b, list | str | int):
            out.append(f"{label} changed ({_short(a)} → {_short(b)})")
        else:
            out.append(f"{label} changed")
    return out


def _dockerfile_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_lines: Any,
    new_text: bytes | None,
    path: str | None,
) -> list[str]:
    """What differs between two `container.dockerfile` bases: the Dockerfile's lines, the
    context files, the build args, the target."""
    out = []
    if old.get("dockerfile") != new.get("dockerfile"):
        where = ""
        if isinstance(old_lines, list) and new_text is not None:
            where = line_changes(old_lines, line_hashes(new_text), new_text)
        name = f"Dockerfile {path}" if path else "the Dockerfile"
        out.append(f"{name} changed ({where})" if where else f"{name} changed")
    a, b = old.get("context"), new.get("context")
    a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})
    for name in sorted(set(a) | set(b)):
        if path is not None and path.endswith("/" + name) and out[:1]:
            continue  # the Dockerfile itself: said above, with its lines
        if name not in a:
            out.append(f"context file {name} added")
        elif name not in b:
            out.append(f"context file {name} removed")
        elif a[name] != b[name]:
            out.append(f"context file {name} changed")
    out.extend(_from_changes(old.get("from"), new.get("from")))
    own = ("dockerfile", "context", "from")
    rest_old = {k: v for k, v in old.items() if k not in own}
    rest_new = {k: v for k, v in new.items() if k not in own}
    for change in diff_inputs(rest_old, rest_new):
        named = change.startswith(("build_args", "target"))
        out.append(f"container.{change}" if named else change)
    return out


def _from_changes(old: Any, new: Any) -> list[str]:
    """What differs in the images a Dockerfile's stages refer to: one that names another
    image now (re-tagged, rebuilt, pulled anew), or one added or no longer used."""
    a, b = (old if isinstance(old, dict) else {}), (new if isinstance(new, dict) else {})
    out = []
    for ref in sorted(set(a) | set(b)):
        if ref not in a:
            out.append(f"FROM image {ref} added")
        elif ref not in b:
            out.append(f"FROM image {ref} no longer used")
        elif a[ref] != b[ref]:
            x, y = a[ref], b[ref]
            x, y = (x if isinstance(x, dict) else {}), (y if isinstance(y, dict) else {})
            what = [
                f"{field} {_short(x.get(field))} → {_short(y.get(field))}"
                for field in ("image_id", "platform")
                if x.get(field) != y.get(field)
            ]
            out.append(f"FROM image {ref} is another image now ({', '.join(what)})")
    return out


def own_changes(step: Step, old: Mapping[str, Any], script: BuildScript | None) -> list[str]:
    """What differs in `step`'s own inputs from its manifest `old`, in the script's terms."""
    old_inputs = old.get("inputs", {})
    if not isinstance(old_inputs, dict):
        old_inputs = {}
    new_inputs = dict(step.inputs)
    if step.kind is StepKind.BASE and "dockerfile" in new_inputs and "dockerfile" in old_inputs:
        text = script_text(script, step) if script is not None else None
        where = script.container.dockerfile if script is not None else None
        return _dockerfile_changes(old_inputs, new_inputs, old.get("lines"), text, where)
    if step.kind is StepKind.BASE:
        return _own_changes(step, old)
    if step.kind is StepKind.RUN:
        text = script_text(script, step) if script is not None else None
        return _run_changes(old_inputs, new_inputs, old.get("lines"), text)
    if step.kind is StepKind.OVERLAYS:
        return _keyed_changes(old_inputs.get("overlays"), new_inputs.get("overlays"), "")
    if step.kind is StepKind.ASSEMBLE:
        return _assemble_changes(old_inputs, new_inputs)
    return diff_inputs(old_inputs, new_inputs)


def _parent_phrase(step: Step, parent: Step) -> str:
    name = field_name(parent)
    if step.kind is StepKind.RUN:
        if parent.kind is StepKind.BASE:
            return "runs on a different base image"
        return f"runs on top of {name}, which changed"
    if step.kind is StepKind.DIFF:
        if parent.kind is StepKind.RUN:
            return f"reads what {name} changed, which ran again"
        if parent.kind is StepKind.BASE:
            return "is laid on a different base image"
        return f"is laid on {name}, which changed"
    if step.kind is StepKind.EXPORT:
        return (
            "exports a different base image"
            if parent.kind is StepKind.BASE
            else f"exports the last layer, {name}, which changed"
        )
    return f"{name} changed"


def explain_step(
    decision: Decision,
    previous: Mapping[str, Any],
    steps: Mapping[str, Step],
    script: BuildScript | None = None,
) -> list[str]:
    """The reasons `decision`'s step runs, one "field: what changed" string each."""
    step = decision.step
    name = field_name(step)
    old = previous.get(step.id)
    if not isinstance(old, dict):
        if not any(isinstance(v, dict) for v in previous.values()):
            return [f"{name}: never built (no earlier build of this script)"]
        return [f"{name}: never built (new since the last build)"]
    if old.get("key") == step.key:
        return [f"{name}: inputs unchanged, but {decision.reason}"]
    own = own_changes(step, old, script)
    if own:
        return [f"{name}: {change}" for change in own]
    reasons = []
    for parent_id in step.parents:
        parent = steps[parent_id]
        before = previous.get(parent_id)
        if isinstance(before, dict) and before.get("key") == parent.key:
            continue
        phrase = _parent_phrase(step, parent)
        cause = own_changes(parent, before, script) if isinstance(before, dict) else []
        if cause:
            phrase += f" ({'; '.join(cause)})"
        reasons.append(f"{name}: {phrase}")
    return reasons or [f"{name}: {decision.reason}"]


def explain_plan(
    decisions: Sequence[Decision], previous: Mapping[str, Any], script: BuildScript | None = None
) -> dict[str, list[str]]:
    """`explain_step` for every step that will run, by step id; and for the base image when
    it differs from the last build (it never "runs": it is resolved, and pulled if need be)."""
    steps = {d.step.id: d.step for d in decisions}
    out = {
        d.step.id: explain_step(d, previous, steps, script)
        for d in decisions
        if d.action is Action.RUN
    }
    for d in decisions:
        old = previous.get(d.step.id)
        if d.step.kind is StepKind.BASE and isinstance(old, dict) and old.get("key") != d.step.key:
            out[d.step.id] = [f"base: {change}" for change in own_changes(d.step, old, script)]
    return out
