"""Platforms as the engines name them: "os/architecture[/variant]" ("linux/arm64").

`container.platform` and `--platform` ask for one; the engine says an image's
(`rfs.engine.lite.platform_of`). They match when the os and the architecture are the same
(after the usual aliases: x86_64 is amd64, aarch64 is arm64) and so is the variant where both
name one, an architecture's default variant counting as named (arm64 is arm64/v8).
"""

from __future__ import annotations

import dataclasses
import re

from rfs.errors import UsageError
from rfs.script.model import BuildScript

PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
FORM = "os/architecture[/variant], such as linux/arm64 or linux/amd64"
_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "i686": "386"}
_DEFAULT_VARIANT = {"arm64": "v8"}


def is_platform(text: str) -> bool:
    """Whether `text` has the form os/architecture[/variant]."""
    return PLATFORM.fullmatch(text) is not None


def _parts(text: str) -> tuple[str, str, str]:
    os_name, _, rest = text.lower().partition("/")
    arch, _, variant = rest.partition("/")
    arch = _ARCH.get(arch, arch)
    return os_name, arch, variant or _DEFAULT_VARIANT.get(arch, "")


def matches(asked: str, found: str) -> bool:
    """Whether an image of platform `found` is one of platform `asked`."""
    a, f = _parts(asked), _parts(found)
    return a[:2] == f[:2] and (not a[2] or not f[2] or a[2] == f[2])


def architecture(platform: str) -> str:
    """The architecture part, aliases resolved ("arm64")."""
    return _parts(platform)[1]


def with_platform(script: BuildScript, platform: str) -> BuildScript:
    """`script` built for `platform` (`--platform`, which wins over `container.platform`)."""
    if not is_platform(platform):
        raise UsageError(f"--platform: {platform!r} is not {FORM}")
    container = dataclasses.replace(script.container, platform=platform)
    return dataclasses.replace(script, container=container)
