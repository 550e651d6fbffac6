"""Counting the calls of a function a test wants to see (or not see) made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def paths_passed(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Path]:
    """Replace `owner.name`, a function of one path, by one that records each path it is
    given before calling the original; return the record."""
    seen: list[Path] = []
    real: Callable[[Path], Any] = getattr(owner, name)

    def recording(path: Path) -> Any:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(owner, name, recording)
    return seen
