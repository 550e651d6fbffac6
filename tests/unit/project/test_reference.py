"""docs/reference.md against the schema and the model: every field the schema reads is
documented with a type, a default and its buildfs equivalent, nothing else is documented, and
each documented type and default agrees with the model's dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import ScriptError
from rfs.script import model
from rfs.script.schema import _KEYS, parse_script

REFERENCE = Path(__file__).parents[3] / "docs" / "reference.md"


def documented() -> dict[str, dict[str, str]]:
    """Rows of the reference tables: field path -> {type, default, buildfs, meaning}."""
    rows: dict[str, dict[str, str]] = {}
    for line in REFERENCE.read_text().splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|\s*$", line)
        if not m:
            continue
        cells = [c.strip() for c in m.group(2).split(" | ")]
        assert len(cells) == 4, f"a reference row needs 5 cells: {line}"
        assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
        rows[m.group(1)] = dict(zip(("type", "default", "buildfs", "meaning"), cells, strict=True))
    return rows


def schema_fields() -> set[str]:
    """Every field path the schema reads, from its table of known keys."""
    handled = {
        "",
        "filesystem",
        "container",
        "image",
        "commands",
        "overlays",
        "export",
        "pathset",
        "copy",
        "outputs",
    }
    assert set(_KEYS) == handled, (
        f"the schema has new sections {set(_KEYS) - handled}: document them in "
        "docs/reference.md and teach this test their paths"
    )
    fields = set(_KEYS[""])
    fields |= {f"filesystem.{k}" for k in _KEYS["filesystem"]}
    fields |= {f"container.{k}" for k in _KEYS["container"]}
    fields |= {f"container.image.{k}" for k in _KEYS["image"]}
    fields |= {f"commands[].{k}" for k in _KEYS["commands"]}
    fields |= {f"overlays[].{k}" for k in _KEYS["overlays"]}
    fields |= {f"copy[].{k}" for k in _KEYS["copy"]}
    fields |= {f"outputs[].{k}" for k in _KEYS["outputs"]}
    fields |= {f"export.{k}" for k in _KEYS["export"]}
    fields |= {f"export.{part}.{k}" for part in _KEYS["export"] for k in _KEYS["pathset"]}
    return fields


def test_every_schema_field_is_documented_and_nothing_else() -> None:
    docs, fields = set(documented()), schema_fields()
    assert not fields - docs, f"undocumented in docs/reference.md: {sorted(fields - docs)}"
    assert not docs - fields, f"documented but not in the schema: {sorted(docs - fields)}"


def test_every_row_is_complete() -> None:
    for path, row in documented().items():
        for column in ("type", "default", "buildfs", "meaning"):
            assert row[column], f"{path}: the {column} column is empty"


# The dataclass and attribute behind each documented field, where there is one.
_MODEL = {
    "filesystem": model.Filesystem,
    "container": model.Container,
    "commands[]": model.Command,
    "overlays[]": model.Overlay,
    "copy[]": model.Copy,
    "outputs[]": model.Output,
    "export.files": model.PathSet,
    "export.directories": model.PathSet,
}
_RENAMED = {"filesystem.dd_block_size_mib": "block_size_mib", "commands[].max_age": "max_age_s"}


def _model_field(path: str) -> dataclasses.Field[object] | None:
    section, _, name = path.rpartition(".")
    cls = _MODEL.get(section)
    if cls is None:
        return None
    name = _RENAMED.get(path, name)
    found = {f.name: f for f in dataclasses.fields(cls)}
    assert name in found, f"{path}: no field {name!r} in model.{cls.__name__}"
    return found[name]


def _expected_type(annotation: str) -> str:
    if "tuple[tuple[str, str]" in annotation:
        return "table of strings"
    if "tuple[str" in annotation:
        return "list of strings"
    if "ImageRef" in annotation:
        return "table"
    if annotation.startswith("bool"):
        return "boolean"
    if annotation.startswith("int"):
        return "integer"
    return "string"  # str and the enums, spelled as strings in a script


def _expected_default(f: dataclasses.Field[object]) -> set[str]:
    value: object
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif callable(f.default_factory):  # MISSING, its other value, is no callable
        value = f.default_factory()
    else:
        return {"required"}
    if isinstance(value, bool):
        return {f"`{str(value).lower()}`"}
    if isinstance(value, enum.Enum):
        return {f'`"{value.value.capitalize()}"`'}
    if value == ():
        return {"`[]`", "`{}`"}
    if value is None:  # optional in the model; the schema may still insist (see below)
        return {"(unset)"}
    return {f"`{value}`"}


# Fields the model leaves None but the schema requires in a form the model cannot express.
_REQUIRED_BY_SCHEMA = {
    "container.image": "required (or `archive` or `dockerfile`)",
    "container.image.tag": "required (unless `digest`)",
    # the model holds what the schema derives when it is left out
    "outputs[].to": "the file name of `path`",
}


def test_types_and_defaults_agree_with_the_model() -> None:
    checked = 0
    for path, row in documented().items():
        f = _model_field(path)
        if f is None:
            continue
        checked += 1
        assert row["type"].startswith(_expected_type(str(f.type))), (
            f"{path}: documented as {row['type']!r}, the model says {f.type}"
        )
        expected = _expected_default(f) | (
            {_REQUIRED_BY_SCHEMA[path]} if path in _REQUIRED_BY_SCHEMA else set()
        )
        assert row["default"] in expected, (
            f"{path}: default {row['default']!r}, the model says {f.default!r}"
        )
    assert checked >= 40  # the mapping above must not silently stop matching rows


def test_reference_test_fails_on_a_missing_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is able to fail: a field added to the schema is caught."""
    keys = dict(_KEYS)
    keys["commands"] = (*keys["commands"], "brand_new_field")
    monkeypatch.setitem(globals(), "_KEYS", keys)
    assert schema_fields() - set(documented()) == {"commands[].brand_new_field"}


# A script with only what the reference calls required, and where each such field lives in it.
_MINIMAL = {
    "container": {"image": {"name": "a", "tag": "b"}},
    "overlays": [{"source_inline": "x", "destination": "/x"}],
    "commands": [{"command": "true"}],
    "copy": [{"source": "/a", "destination": "/a"}],
    "outputs": [{"path": "/etc/x"}],
}
_WHERE = {
    "container": ("container",),
    "container.image": ("container", "image"),
    "container.image.name": ("container", "image", "name"),
    "container.image.tag": ("container", "image", "tag"),
    "overlays[].destination": ("overlays", 0, "destination"),
    "copy[].source": ("copy", 0, "source"),
    "copy[].destination": ("copy", 0, "destination"),
    "outputs[].path": ("outputs", 0, "path"),
}


def test_required_means_required_and_nothing_else_is() -> None:
    """The "required" column against the parser: the script holding only the documented
    required fields parses (so `filesystem.size_mib` and the rest are optional), and each one
    left out is an error at its path."""
    required = {p for p, row in documented().items() if row["default"].startswith("required")}
    assert required == set(_WHERE), "teach _WHERE where the newly required fields go"
    script, _ = parse_script(copy.deepcopy(_MINIMAL))
    assert script.filesystem.size_mib is None
    for path, where in _WHERE.items():
        doc: Any = copy.deepcopy(_MINIMAL)
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        del parent[where[-1]]
        with pytest.raises(ScriptError) as info:
            parse_script(doc)
        assert path.replace("[]", "[0]") in {p.path for p in info.value.problems}
