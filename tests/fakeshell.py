"""The tiny command language the fake engine's commands speak in the pipeline's unit tests
(rfs.engine.fake runs a Python callable in place of each command): `write PATH TEXT` writes
TEXT to PATH and `fail` exits non-zero; `shell_of` makes the variant a test module needs."""

from __future__ import annotations

import re
from collections.abc import Callable

from rfs.engine.fake import FakeRun

Shell = Callable[[FakeRun], int]


def shell_of(
    *,
    newline: bool = True,
    fail_code: int = 3,
    say: bool = False,
    script_to: str | None = None,
    sh_c: bool = False,
    strict: bool = True,
) -> Shell:
    """A command interpreter: `write PATH TEXT` (TEXT, plus a newline with `newline`; `say`:
    prints `wrote PATH`), `fail` (prints `about to fail`, exits `fail_code`). `script_to`: a
    script (`/.rfs/script`) is copied there. `sh_c`: `/bin/sh -c TEXT` runs TEXT with `${NAME}`
    expanded from the container's environment. `strict`: any other command is a test error,
    else it succeeds doing nothing."""

    def shell(ctx: FakeRun) -> int:
        argv = list(ctx.argv)
        if sh_c and argv[:2] == ["/bin/sh", "-c"]:
            text = re.sub(r"\$\{(\w+)\}", lambda m: ctx.spec.env.get(m.group(1), ""), argv[2])
            argv = text.split()
        if argv[0] == "write":
            ctx.write(argv[1], argv[2].encode() + (b"\n" if newline else b""))
            if say:
                ctx.print(f"wrote {argv[1]}")
            return 0
        if argv[0] == "fail":
            ctx.print("about to fail")
            return fail_code
        if script_to is not None and argv[-1] == "/.rfs/script":
            ctx.write(script_to, ctx.read("/.rfs/script"))
            return 0
        if strict:
            raise AssertionError(f"unexpected command {argv}")
        return 0

    return shell
