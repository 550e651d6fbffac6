"""`rfs pack` and `rfs unpack`: a package in any of its four forms.

`pack` writes only the build script and the files it references (like buildfs, minus its bug
of copying host paths), in sorted order with fixed owners, modes and times, so packing the same
package twice gives the same bytes. `unpack` extracts an archive package (checked member by
member, `rfs.script.archive`) into a new directory.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from rfs.errors import Problem, ScriptError, UsageError
from rfs.host.orphans import remove_tree
from rfs.script.archive import PackageType, detect, extract, member_path
from rfs.script.schema import SCRIPT_NAMES


def _empty_target(dst: Path) -> None:
    if dst.is_dir():
        if any(dst.iterdir()):
            raise UsageError(f"{dst} exists and is not empty")
    elif dst.exists() or dst.is_symlink():
        raise UsageError(f"{dst} exists and is not a directory")


def unpack(src: Path, dst: Path) -> Path:
    """`rfs unpack`: unpack the archive package `src` into the new or empty directory `dst`."""
    kind = detect(src)
    if not kind.is_archive:
        raise UsageError(f"{src} is a {kind.value} package, not a tar archive: nothing to unpack")
    _empty_target(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the destination and moved into place: a failure leaves nothing behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.rfs-", dir=dst.parent))
    try:
        root = extract(src, tmp)
        root.chmod(0o755)  # mkdtemp made it private; the result is an ordinary directory
        if dst.is_dir():
            dst.rmdir()
        root.rename(dst)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return dst


# -- packing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: str  # relative, normalised
    kind: str  # "file" | "dir" | "link"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""


def _script_name(script_file: Path) -> str:
    return "build.yaml" if script_file.suffix in (".yaml", ".yml") else "build.toml"


def _file_mode(st: os.stat_result) -> int:
    # Only "executable or not" survives, as in cache keys: the rest is the packer's umask.
    return 0o755 if st.st_mode & 0o111 else 0o644


def _tree_entries(host: Path, rel: str, where: str, file: str) -> Iterator[_Entry]:
    yield _Entry(rel, "dir", mode=0o755)
    for dirpath, dirnames, filenames in os.walk(host, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            sub = f"{rel}/{path.relative_to(host).as_posix()}"
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield _Entry(sub, "link", mode=0o777, target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                yield _Entry(sub, "dir", mode=0o755)
            elif stat.S_ISREG(st.st_mode):
                yield _Entry(sub, "file", path.read_bytes(), _file_mode(st))
            else:
                raise ScriptError(
                    [
                        Problem(
                            where,
                            f"{path} is a device, FIFO or socket; a "
                            "package holds only files, directories and "
                            "links",
                            file,
                        )
                    ]
                )


def _entries(src: Path) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """The package's files as entries, and its references as (field path, reference)."""
    from rfs.script.package import load, references, resolve_reference

    loaded = load(src)
    script = loaded.script
    root = script.package_root
    file = str(script.origin or script.script_file)
    entries: dict[str, _Entry] = {}
    script_path = script.script_file if root is None else root / script.script_file.name
    entries[_script_name(script_path)] = _Entry(
        _script_name(script_path), "file", script_path.read_bytes()
    )
    refs = references(script)
    for where, ref, _kind in refs:
        assert root is not None  # load() refuses references without a package root
        host = resolve_reference(root, ref)
        rel = member_path(ref)
        if host.is_dir():
            for entry in _tree_entries(host, rel, where, file):
                entries.setdefault(entry.path, entry)
        else:
            entries[rel] = _Entry(rel, "file", host.read_bytes(), _file_mode(host.stat()))
    for path in list(entries):  # parents of every entry, so extraction needs no guessing
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, _Entry(parent, "dir", mode=0o755))
    return sorted(entries.values(), key=lambda e: e.path), [(w, r) for w, r, _ in refs]


def _write_tar(entries: Sequence[_Entry], out: IO[bytes]) -> None:
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mtime, info.mode, info.uid, info.gid = mtime, e.mode, 0, 0
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))


def _write_dir(entries: Sequence[_Entry], dest: Path) -> None:
    for e in entries:
        path = dest / e.path
        if e.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(e.mode)
        elif e.kind == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(e.target)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(e.data)
            path.chmod(e.mode)


def _refuse_inside(src: Path, dst: Path) -> None:
    """buildfs could pack a file onto itself; refuse any destination inside the source."""
    source = src.resolve()
    target = dst.resolve()
    root = source if source.is_dir() else source.parent
    if target == source or (source.is_dir() and root in target.parents):
        raise UsageError(f"{dst} lies inside the package {src}; choose a destination outside it")


def pack(src: Path, dst: Path, kind: PackageType) -> int:
    """`rfs pack`: write the package `src` (any form) to `dst` as `kind`; return the file count.

    The result holds the build script and every file it references, nothing else. It is
    written beside `dst` and renamed into place, so a failure leaves `dst` untouched.
    """
    _refuse_inside(src, dst)
    entries, refs = _entries(src)
    if kind is PackageType.BUILD_SCRIPT and refs:
        raise ScriptError(
            [
                Problem(
                    where,
                    f"{ref}: a single build script cannot carry package "
                    "files; pack as directory, tar or tar-gz",
                    str(src),
                )
                for where, ref in refs
            ]
        )
    if kind is PackageType.DIRECTORY:
        _empty_target(dst)
    elif dst.is_dir():
        raise UsageError(f"{dst} is a directory; give the file to write")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind is PackageType.DIRECTORY:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.rfs-", dir=dst.parent))
        try:
            _write_dir(entries, tmp)
            tmp.chmod(0o755)
            if dst.is_dir():
                dst.rmdir()
            tmp.rename(dst)
        finally:
            if tmp.exists():
                remove_tree(tmp)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.rfs-", dir=dst.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as raw:
                if kind is PackageType.BUILD_SCRIPT:
                    raw.write(
                        entries[0].data
                        if len(entries) == 1
                        else next(e.data for e in entries if e.path in SCRIPT_NAMES)
                    )
                elif kind is PackageType.TAR:
                    _write_tar(entries, raw)
                else:
                    # mtime 0 and no file name in the gzip header: the same package gives the
                    # same bytes.
                    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                        _write_tar(entries, cast(IO[bytes], gz))
            tmp.chmod(0o644)
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
    return sum(1 for e in entries if e.kind == "file")
