"""Reading typed fields out of a parsed build script, collecting every problem with its path
instead of raising at the first (`rfs.script.schema` and `rfs.script.recipes` build on it)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from rfs.errors import Problem

T = TypeVar("T")


class Reader:
    """Reads typed fields out of nested mappings, recording problems instead of raising."""

    def __init__(self, file: str, keys: Mapping[str, tuple[str, ...]]) -> None:
        self.file = file
        self.keys = keys  # the known keys of each table, for typos' warnings
        self.problems: list[Problem] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, self.file))

    def warn(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, self.file, severity="warning"))

    def table(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any] | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"must be a table, not {_kind(value)}")
            return None
        return value

    def check_keys(self, data: Mapping[str, Any], known: str, path: str) -> None:
        allowed = self.keys[known]
        for key in data:
            if key in allowed:
                continue
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.warn(where, f"unknown key, ignored{hint}")

    def get(self, data: Mapping[str, Any], key: str, path: str, kind: type[T], default: T) -> T:
        value = data.get(key)
        if value is None:
            return default
        # bool is an int subclass in Python; a size of `true` is a mistake, not 1.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.error(path, f"must be {_name(kind)}, not {_kind(value)}")
            return default
        return value

    def opt(self, data: Mapping[str, Any], key: str, path: str, kind: type[T]) -> T | None:
        if data.get(key) is None:
            return None
        value: T | None = self.get(data, key, path, kind, None)
        return value

    def text(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        return self.opt(data, key, path, str)

    def count(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        *,
        minimum: int = 0,
        maximum: int | None = None,
    ) -> int | None:
        value = self.opt(data, key, path, int)
        if value is None:
            return None
        if value < minimum:
            self.error(path, f"must be at least {minimum}, not {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(path, f"must be at most {maximum}, not {value}")
            return None
        return value

    def strings(self, data: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        value = data.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(path, "must be a list of strings")
            return ()
        return tuple(value)

    def mapping(self, data: Mapping[str, Any], key: str, path: str) -> tuple[tuple[str, str], ...]:
        value = data.get(key)
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            self.error(path, f"must be a table of strings, not {_kind(value)}")
            return ()
        pairs = []
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                self.error(f"{path}.{k}", f"must be a string, not {_kind(v)}")
                continue
            pairs.append((str(k), str(v)))
        return tuple(sorted(pairs))

    def image_path(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        """An absolute path inside the image or the package; `..` is refused."""
        value = self.text(data, key, path)
        if value is None:
            return None
        return self.check_abs(value, path)

    def check_abs(self, value: str, path: str) -> str | None:
        if not value.startswith("/"):
            value = "/" + value  # buildfs treats every reference as rooted; keep that
        parts = [p for p in value.split("/") if p not in ("", ".")]
        if ".." in parts:
            self.error(path, f"{value!r} must not contain '..'")
            return None
        if "\x00" in value:  # no file name holds one; the OS would cut the path there
            self.error(path, f"{value!r} must not contain a NUL character")
            return None
        return "/" + "/".join(parts)


def _kind(value: object) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean (true/false)"}.get(
        kind, kind.__name__
    )
