"""The code digests in the keys cover every module that can shape an artifact.

`rfs.graph.codeversion.SHAPED_BY` lists, per step kind, the modules whose code decides what its
artifact holds. This test follows the imports (lazy ones inside functions included) of each
kind's entry modules: every rfs module they reach must be listed there or below, or named in
NEUTRAL here with the reason it cannot change a result. A new module that the assembly or the
executor imports therefore fails this test until someone decides where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rfs.graph.codeversion import PACKAGE, SHAPED_BY, _files, code_version

# Modules that may be imported on the way but cannot change what an artifact holds.
NEUTRAL = {
    "errors.py": "exception types and exit codes",
    "script/model.py": "the parsed script; its values are keyed as inputs",
    "graph/steps.py": "step records; keys are computed from inputs",
    "run/store.py": "where artifacts are kept, verified by their hashes",
    "host/locks.py": "file locks",
    "report/reporter.py": "progress display",
    "report/events.py": "progress events",
    "report/progress.py": "progress display",
    "host/orphans.py": "removal of leftovers",
    "host/signals.py": "Ctrl-C handling",
    "script/schema.py": "parsing; its result is keyed as inputs",
    "script/recipes.py": "parsing; its result is keyed as inputs",
    "script/reader.py": "parsing; its result is keyed as inputs",
    "script/packing.py": "rfs pack/unpack; never run by a build",
    "script/archive.py": "unpacks package archives; what they hold is keyed by content",
    "script/document.py": "parses build scripts; their values are keyed as inputs",
    "graph/codeversion.py": "this module",
    "__init__.py": "package markers",
    "fs/tools.py": "reads tool versions, which are keyed themselves",
    "graph/planner.py": "decides which steps run, not what they make",
    "run/checks.py": "tells a host's refusal of privilege from a command's failure; makes nothing",
    "script/platform.py": "the form of a platform and matching; the platform is keyed as an input",
    "host/emulation.py": "tells whether the host can run a platform's programs; makes nothing",
}
# Where each kind's artifact is made (executors.py, the glue, is listed for every kind and
# checked as a whole below, so the walk does not go through it: rfs.run.layerchain names its
# Executor type).
ENTRIES = {
    "run": ["engine/docker_engine.py", "run/etcfiles.py", "run/snapshot.py", "run/basefacts.py"],
    "export": ["engine/docker_engine.py"],
    "diff": ["engine/docker_engine.py", "run/layerchain.py"],
    "assemble": ["fs/assemble.py", "run/etcfiles.py", "run/snapshot.py"],
}


def _module_path(name: str) -> Path | None:
    if not name.startswith("rfs"):
        return None
    parts = name.split(".")[1:]
    base = PACKAGE.joinpath(*parts) if parts else PACKAGE
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            # importlib.import_module(f"rfs.fs.{...}"): the drivers, all under rfs/fs
            found.update((PACKAGE / "fs").glob("*.py"))
        for name in names:
            module = _module_path(name)
            if module is not None:
                found.add(module)
    return found


GLUE = PACKAGE / "run" / "executors.py"


def _closure(entries: list[str]) -> set[Path]:
    todo = [PACKAGE / e for e in entries]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path == GLUE and GLUE not in [PACKAGE / e for e in entries]:
            continue  # reached, not walked: it is checked as a whole
        todo.extend(_imports(path) - seen)
    return seen


@pytest.mark.parametrize("kind", sorted(SHAPED_BY))
def test_every_module_an_artifact_depends_on_is_in_its_code_digest(kind: str) -> None:
    listed = set(_files(SHAPED_BY[kind]))
    neutral = {PACKAGE / name for name in NEUTRAL} | set(PACKAGE.rglob("__init__.py"))
    reached = _closure(ENTRIES[kind])
    unclassified = sorted(str(p.relative_to(PACKAGE)) for p in reached - listed - neutral)
    assert not unclassified, (
        f"{kind} artifacts depend on {unclassified}: add them to rfs.graph.codeversion.SHAPED_BY "
        "or, if they cannot change a result, to NEUTRAL in this test"
    )


def test_everything_the_executor_reaches_is_classified() -> None:
    listed = {p for entries in SHAPED_BY.values() for p in _files(entries)}
    neutral = {PACKAGE / name for name in NEUTRAL} | set(PACKAGE.rglob("__init__.py"))
    reached = _closure(["run/executors.py"])
    assert all(PACKAGE / "run/executors.py" in _files(e) for e in SHAPED_BY.values())
    unclassified = sorted(str(p.relative_to(PACKAGE)) for p in reached - listed - neutral)
    assert not unclassified, (
        f"classify {unclassified} in rfs.graph.codeversion.SHAPED_BY or NEUTRAL"
    )


def test_the_closure_walk_finds_lazy_imports() -> None:
    """The check above can fail: the lazy import of the drivers is seen."""
    assert PACKAGE / "fs" / "ext4.py" in _closure(["fs/assemble.py"])
    assert PACKAGE / "fs" / "ext4patch.py" in _closure(["fs/assemble.py"])
    assert PACKAGE / "fs" / "layered.py" in _closure(["run/layerchain.py"])


def test_code_versions_differ_per_kind_and_are_stable() -> None:
    versions = {kind: code_version(kind) for kind in SHAPED_BY}
    assert len(set(versions.values())) == len(versions)
    code_version.cache_clear()
    assert {kind: code_version(kind) for kind in SHAPED_BY} == versions
