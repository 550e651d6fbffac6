"""Building a Dockerfile through the engine's build API (Docker's /build, Podman's compatible
one), for `container.dockerfile` bases.

The context is rfs's own tar (`rfs.script.buildcontext`), sent as a custom context; nothing is
pulled (`pull=False`: bases are local, there may be no registry) and intermediate containers
are removed even when a step fails (`rm`, `forcerm`). The engine streams JSON messages:
`stream` lines of output (Docker's classic builder says `Step 3/7 : RUN …`, Podman's
`STEP 3/7: RUN …`), an `error` on failure. The failure becomes one StepFailed naming the
Dockerfile's failing instruction and the output's last lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

from rfs.engine.apicalls import ApiCaller
from rfs.errors import StepFailed

# "Step 3/7 : RUN make" (Docker) or "STEP 3/7: RUN make" (Podman, buildah).
_STEP_LINE = re.compile(r"^(?:Step|STEP) (\d+/\d+) ?: ?(.*)$")
_TAIL_LINES = 15


def failing_instruction(lines: Iterable[str]) -> str | None:
    """The last instruction the builder announced ("3/7 RUN make"), or None."""
    found = None
    for line in lines:
        match = _STEP_LINE.match(line.strip())
        if match:
            found = f"{match.group(2).strip()} (step {match.group(1)})"
    return found


def build_image(
    engine: ApiCaller,
    context: BinaryIO,
    *,
    dockerfile: str,
    tag: str,
    step: str,
    build_args: Mapping[str, str],
    target: str | None,
    on_output: Callable[[bytes], None] | None,
    no_cache: bool = False,
    platform: str | None = None,
) -> None:
    """Build through `engine`'s API, tagging the result `tag`; see
    `rfs.engine.base.Engine.build_image`."""
    lines: list[str] = []
    error: str | None = None
    with engine._calling(f"build the Dockerfile {dockerfile}"):
        messages: Iterable[Any] = engine._api.build(
            fileobj=context,
            custom_context=True,
            dockerfile=dockerfile,
            tag=tag,
            buildargs=dict(build_args),
            target=target,
            pull=False,
            nocache=no_cache,
            platform=platform,
            rm=True,
            forcerm=True,
            decode=True,
            # A RUN may print nothing for longer than the API time-out; the build ends when
            # the engine says so.
            timeout=None,
        )
        for message in messages:
            if not isinstance(message, dict):
                continue
            text = message.get("stream")
            if isinstance(text, str) and text:
                lines.extend(text.splitlines())
                if on_output is not None:
                    on_output(text.encode())
            if message.get("error") or message.get("errorDetail"):
                detail = message.get("errorDetail")
                error = str(
                    message.get("error")
                    or (detail.get("message") if isinstance(detail, dict) else detail)
                )
    if error is not None:
        instruction = failing_instruction(lines)
        where = f" at `{instruction}`" if instruction else ""
        raise StepFailed(
            step,
            f"the {engine._title} build of {dockerfile} failed{where}: {error.strip()}",
            "\n".join(lines[-_TAIL_LINES:]),
        )
