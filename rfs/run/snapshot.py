"""A build's private snapshot of the package files its steps use.

Keys are computed from package files while planning; the steps run later, maybe minutes later
(a long `apt-get`), while the user goes on editing (`rfs build --watch`). So no step reads the
package itself: the first time a step needs a file or tree, it is copied into the build's own
scratch directory and hashed on the way, and the copy is used only if its digest is the one the
keys were computed from. An edit made after planning therefore never lands under the key of the
old content: the build stops with a message naming the file, records nothing for the step, and
the next build (or the next round of `--watch`) plans with the new content.

The copy also normalises modes (0755/0644 by the owner's execute bit, directories 0755), the
same rule the key applies, so a command sees what was keyed on every machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from rfs.errors import RfsError
from rfs.host.hashing import NotCopyable, digest_input
from rfs.script.package import resolve_reference

# Same prefix as the steps' scratch directories: a later build removes those of dead builds.
SNAPSHOT_PREFIX = "rfs-step-"


class PackageChanged(RfsError):
    """A package file changed between planning and its use: nothing was recorded for it."""


class PackageSnapshot:
    """Copies of package references, taken on first use and checked against `digests`."""

    def __init__(self, root: Path | None, digests: Mapping[str, str], mtime: int = 0) -> None:
        self.root = root
        self.mtime = mtime  # every copy's timestamp: times are not keyed, so none may show
        self.digests = dict(digests)
        self._dir: Path | None = None
        self._copies: dict[str, Path] = {}
        self._made = 0

    def path(self, ref: str) -> Path:
        """The snapshot's copy of package reference `ref` (copied and checked on first use)."""
        found = self._copies.get(ref)
        if found is not None:
            return found
        if self.root is None:
            raise RfsError(f"{ref}: a build script without a package references no files")
        source = resolve_reference(self.root, ref)
        copy = self._directory() / str(self._made)
        self._made += 1
        try:
            digest = digest_input(source, copy_to=copy)
        except NotCopyable as exc:
            raise RfsError(f"cannot use package path {ref}: {exc}") from exc
        except OSError as exc:
            raise PackageChanged(
                f"package path {ref} could not be read ({exc}); it changed "
                "while rfs was building: run the build again"
            ) from exc
        if digest != self.digests.get(ref):
            raise PackageChanged(
                f"package path {ref} changed after rfs planned this build; nothing was "
                "recorded under its old content: run the build again to use the new one"
            )
        _set_times(copy, self.mtime)
        self._copies[ref] = copy
        return copy

    def take(self, refs: Iterable[str]) -> None:
        """Copy `refs` now (at the start of a build, so the window for edits is short)."""
        for ref in refs:
            self.path(ref)

    def _directory(self) -> Path:
        if self._dir is None:
            # The pid in the name lets a later build remove it if this process is killed.
            self._dir = Path(tempfile.mkdtemp(prefix=f"{SNAPSHOT_PREFIX}{os.getpid()}-snap-"))
            self._dir.chmod(0o755)  # commands may run as any uid and read mounted copies
        return self._dir

    def close(self) -> None:
        """Remove the copies."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._copies.clear()


def _set_times(root: Path, mtime: int) -> None:
    """Give everything under `root` (and `root`) the same access and modification time."""
    times = (mtime, mtime)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), times, follow_symlinks=False)
    os.utime(root, times, follow_symlinks=False)
