"""Decide what the image stream holds: which export entries stay, what is created or overlaid.

Everything is decided before a byte is written, so conflicts resolve the way copying onto a
real filesystem would: an overlay replaces whatever was at its path (a file over a directory
drops the directory's subtree; a directory over a directory only updates its owner and mode),
and a path on the way to an overlay that is not a directory gives way to one. Symlinks on the
way are followed, as a copy inside the container would (on a merged-/usr image, an overlay at
/lib/x lands in /usr/lib/x instead of replacing the /lib symlink), and so is a symlink to a
directory where an overlay puts a directory (a tree's sbin/ merges into /usr/sbin). Relying on
mke2fs for that is unsafe: its tar reader corrupts the image when a file entry follows a
directory entry of the same path (the directory becomes unreachable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rfs.fs import tarformat as tf
from rfs.fs.overlay import OverlayEntry
from rfs.fs.selection import (
    Matcher,
    Selection,
    ancestors,
    check_destination,
    components,
    decode,
    normalise,
    resolve,
)

STICKY_TMP = frozenset({"/tmp", "/var/tmp"})


@dataclass(eq=False)
class Generated:
    """An entry rfs adds after the export: a created path or an overlay."""

    path: str
    typeflag: int  # tf.REGULAR, tf.DIRECTORY, tf.SYMLINK or tf.CHARDEV
    mode: int
    uid: int = 0
    gid: int = 0
    content: bytes = b""
    target: str = ""  # symlink target
    dropped: bool = False  # replaced by a later overlay
    device: tuple[int, int] = (0, 0)  # major, minor of a device node


@dataclass(eq=False)
class _Node:
    """One thing that will sit at a path: an export entry (by index) or a generated entry."""

    typeflag: int
    index: int = -1
    generated: Generated | None = None


@dataclass
class Plan:
    """The outcome of planning: per export entry, keep or not; then what to append."""

    entries: list[tf.RawEntry]
    paths: list[str]  # normalised path per entry ("" for PAX global headers)
    keep: list[bool]
    by_path: dict[str, tf.RawEntry]  # the whole export, for hard-link targets that were dropped
    generated: list[Generated] = field(default_factory=list)
    missing_includes: list[str] = field(default_factory=list)
    restore: dict[str, bytes] = field(default_factory=dict)
    # The plan as it stood before the overlays (for rfs.fs.ext4patch): `keep`, and the
    # `dropped` flags of the first `len(...)` generated entries, then.
    keep_without_overlays: list[bool] = field(default_factory=list)
    dropped_without_overlays: list[bool] = field(default_factory=list)

    def snapshot(self) -> None:
        """Remember the plan as it is now: everything but the overlays is laid out."""
        self.keep_without_overlays = list(self.keep)
        self.dropped_without_overlays = [g.dropped for g in self.generated]


def make_plan(
    entries: list[tf.RawEntry],
    selection: Selection,
    overlays: Sequence[OverlayEntry],
    restore: Mapping[str, bytes],
) -> Plan:
    """Select export entries and lay out created paths and overlays (see the module doc)."""
    paths: list[str] = []
    by_path: dict[str, tf.RawEntry] = {}
    for entry in entries:
        if entry.typeflag == tf.PAX_GLOBAL:
            paths.append("")
            continue
        text = decode(entry.name)
        if ".." in text and ".." in components(text):
            raise tf.TarError(f"the export tarball holds an unsafe path {text!r}")
        path = normalise(text)
        paths.append(path)
        by_path[path] = entry

    def export_symlink(path: str) -> str | None:
        found = by_path.get(path)
        return decode(found.linkname) if found and found.typeflag == tf.SYMLINK else None

    matcher = Matcher(selection, export_symlink)
    plan = Plan(entries, paths, [False] * len(entries), by_path)
    plan.missing_includes = [
        p
        for p in matcher.requested
        if resolve(p, export_symlink, follow_last=False)[0] not in by_path
    ]
    plan.restore = {check_destination(k, "restore"): v for k, v in restore.items()}
    keep = plan.keep
    for i, path in enumerate(paths):
        keep[i] = not path or matcher.keeps(path)
    _add_console(plan)
    if not (selection.create_dirs or selection.create_files or overlays):
        plan.snapshot()
        return plan
    layout = _Layout(plan)
    for i, (entry, path) in enumerate(zip(entries, paths, strict=True)):
        if path and keep[i]:
            layout.add(path, _Node(entry.typeflag, index=i))
    for raw in selection.create_dirs:
        mode = 0o1777 if normalise(raw) in STICKY_TMP else 0o755
        layout.create(check_destination(raw, "export create"), tf.DIRECTORY, mode)
    for raw in selection.create_files:
        layout.create(check_destination(raw, "export create"), tf.REGULAR, 0o644)
    plan.snapshot()
    for overlay in overlays:
        layout.overlay(overlay)
    return plan


CONSOLE = "/dev/console"


def _add_console(plan: Plan) -> None:
    """Give a kept /dev without a console the char device 5,1 a booting kernel writes to.

    `podman export` leaves /dev/console out (Docker exports an empty file, which the emitter
    turns into the device), and init without /dev/console loses its early messages.
    """
    dev = plan.by_path.get("/dev")
    if dev is None or dev.typeflag != tf.DIRECTORY or CONSOLE in plan.by_path:
        return
    if not plan.keep[plan.paths.index("/dev")]:
        return
    plan.generated.append(Generated(CONSOLE, tf.CHARDEV, 0o600, device=(5, 1)))


class _Layout:
    """The tree as it will be: used to resolve symlinks and settle conflicts."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.nodes: dict[str, list[_Node]] = {}
        self._holders: set[str] | None = None

    def add(self, path: str, node: _Node) -> None:
        self.nodes.setdefault(path, []).append(node)
        if self._holders is not None:
            self._holders.update(ancestors(path))

    def _holding(self) -> set[str]:
        """Every path something was put below (made on first use, then kept up to date)."""
        if self._holders is None:
            self._holders = {above for p in self.nodes for above in ancestors(p)}
        return self._holders

    def _symlink(self, path: str) -> str | None:
        nodes = self.nodes.get(path)
        if not nodes or nodes[-1].typeflag != tf.SYMLINK:
            return None
        node = nodes[-1]
        if node.generated is not None:
            return node.generated.target
        return decode(self.plan.entries[node.index].linkname)

    def _remove(self, path: str) -> None:
        doomed = [path]
        nodes = self.nodes.get(path, [])
        if any(n.typeflag == tf.DIRECTORY for n in nodes):
            prefix = path + "/"
            doomed += [p for p in self.nodes if p.startswith(prefix)]
        for p in doomed:
            for node in self.nodes.pop(p, []):
                if node.generated is not None:
                    node.generated.dropped = True
                else:
                    self.plan.keep[node.index] = False

    def _make_way(self, path: str) -> str:
        """Resolve symlinks on the way to `path`; clear anything there that is not a directory."""
        resolved, _ = resolve(path, self._symlink, follow_last=False)
        for above in ancestors(resolved):
            nodes = self.nodes.get(above)
            if nodes and nodes[-1].typeflag != tf.DIRECTORY:
                self._remove(above)
        return resolved

    def create(self, path: str, typeflag: int, mode: int) -> None:
        """Add an empty file or directory unless something is already at `path`."""
        if path == "/":
            return
        path = self._make_way(path)
        if path in self.nodes:
            return
        generated = Generated(path, typeflag, mode)
        self.plan.generated.append(generated)
        self.add(path, _Node(typeflag, generated=generated))

    def overlay(self, overlay: OverlayEntry) -> None:
        """Add an overlay, replacing whatever the export or an earlier overlay put there."""
        path = overlay.check()
        if path == "/":
            return  # the image root exists already; a host directory's mode must not leak in
        path = self._make_way(path)
        if overlay.is_dir:
            # A directory laid onto a symlink to a directory is written through it, as `cp -r`
            # would: a tree with sbin/ over a merged-/usr `/sbin -> usr/sbin` adds to /usr/sbin
            # and the link stays (its entries below follow it on their own).
            through, _ = resolve(path, self._symlink, follow_last=True)
            found = self.nodes.get(through)
            if through != path and found and found[-1].typeflag == tf.DIRECTORY:
                path = through
            generated = Generated(path, tf.DIRECTORY, overlay.mode, overlay.uid, overlay.gid)
        elif overlay.symlink is not None:
            generated = Generated(
                path, tf.SYMLINK, 0o777, overlay.uid, overlay.gid, target=overlay.symlink
            )
        else:
            content = overlay.content or b""
            generated = Generated(path, tf.REGULAR, overlay.mode, overlay.uid, overlay.gid, content)
        existing = self.nodes.get(path)
        if existing and not (overlay.is_dir and existing[-1].typeflag == tf.DIRECTORY):
            self._remove(path)
        if not overlay.is_dir and path in self._holding():
            # A path can hold entries below it with no entry of its own (an earlier overlay's
            # missing parent, an export without a directory's entry): they go as well.
            prefix = path + "/"
            for below in [p for p in self.nodes if p.startswith(prefix)]:
                self._remove(below)
        self.plan.generated.append(generated)
        self.add(path, _Node(generated.typeflag, generated=generated))
