"""Key versions derived from the code that shapes each kind of artifact.

A version number that someone must remember to bump is a version number that will be
forgotten (the tar filter changed more than once without one). Instead each step kind's key
holds the digest of the source of the rfs modules that decide what its artifact contains: an
rfs upgrade that touches the assembly code makes new images from the cached exports, one that
touches the engine adapter runs the commands again, and one that touches only the CLI reuses
everything. `tests/unit/project/test_codeversion.py` walks the imports of each kind's entry
modules and fails when an imported module is neither listed here nor declared unable to shape a
result.
"""

from __future__ import annotations

import functools
from pathlib import Path

from rfs.host.hashing import digest_bytes, digest_json

PACKAGE = Path(__file__).resolve().parents[1]

# Package-relative files and directories (every *.py below) whose code shapes each kind.
SHAPED_BY: dict[str, tuple[str, ...]] = {
    # The container a command runs in (mounts, env, user, /etc files) and how it is committed.
    "run": (
        "run/executors.py",
        "run/earlyexport.py",
        "run/etcfiles.py",
        "run/snapshot.py",
        "host/hashing.py",
        "script/package.py",
        "script/basearchive.py",
        "script/buildcontext.py",
        "script/dockerfrom.py",
        "run/basefacts.py",
        "host/sparse.py",
        "run/copyin.py",
        "engine",
    ),
    # How the container filesystem is streamed out of the engine into the tarball.
    "export": (
        "run/executors.py",
        "run/earlyexport.py",
        "run/exporting.py",
        "host/sparse.py",
        "engine",
    ),
    # What a command changed, or its layer's export (rfs.run.layerchain): the diff's form,
    # when a step becomes an anchor.
    "diff": (
        "run/executors.py",
        "run/earlyexport.py",
        "run/exporting.py",
        "run/layerchain.py",
        "host/sparse.py",
        "host/hashing.py",
        "host/proc.py",
        "engine",
        "fs",  # the layered export's rules and the export's parsed headers
    ),
    # Everything between the tarball and the image: the tar filter, overlays, every driver.
    "assemble": (
        "run/executors.py",
        "run/earlyexport.py",
        "run/baseimages.py",
        "run/etcfiles.py",
        "run/snapshot.py",
        "host/hashing.py",
        "script/package.py",
        "host/sparse.py",
        "host/proc.py",
        "host/childio.py",
        "fs",
    ),
}


# Below those directories but never part of a real build: the engine for tests.
NOT_SHAPING = frozenset({"engine/fake.py", "engine/fakebuild.py"})


def _files(entries: tuple[str, ...]) -> list[Path]:
    found: set[Path] = set()
    for entry in entries:
        path = PACKAGE / entry
        found.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(p for p in found if p.relative_to(PACKAGE).as_posix() not in NOT_SHAPING)


@functools.cache
def code_version(kind: str) -> str:
    """The digest of the code that shapes artifacts of `kind` ("run", "export", "assemble").

    Computed once per process, from the files this process loaded its code from: a
    long-running `rfs build --watch` keeps the version of the code it runs.
    """
    return digest_json(
        [
            [path.relative_to(PACKAGE).as_posix(), digest_bytes(path.read_bytes())]
            for path in _files(SHAPED_BY[kind])
        ]
    )
