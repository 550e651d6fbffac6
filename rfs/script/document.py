"""A build script's bytes as a document: TOML, or YAML by the file's suffix; nothing else.

Parsing errors become `ScriptError`s naming the file, with the line where the parser says.
"""

from __future__ import annotations

import tomllib
from typing import Any

from rfs.errors import Problem, ScriptError


def parse_bytes(raw: bytes, suffix: str, label: str) -> Any:
    """Parse a build script's bytes as YAML (suffix .yaml/.yml) or TOML; `label` names it."""
    path = label
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScriptError(
            [Problem("", f"is not UTF-8 text (byte {exc.start})", str(path))]
        ) from exc
    if suffix in (".yaml", ".yml"):
        import yaml  # only YAML users pay for the import

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ScriptError([Problem("", f"invalid YAML: {where}{problem}", str(path))]) from exc
        except (RecursionError, ValueError) as exc:
            raise ScriptError(
                [Problem("", f"invalid YAML: {_unparsable(exc)}", str(path))]
            ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScriptError([Problem("", f"invalid TOML: {exc}", str(path))]) from exc
    except (RecursionError, ValueError) as exc:
        raise ScriptError([Problem("", f"invalid TOML: {_unparsable(exc)}", str(path))]) from exc


def _unparsable(exc: BaseException) -> str:
    """What the parsers' own limits mean, for a document no build script looks like."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)  # e.g. Python's limit on the digits of an integer
