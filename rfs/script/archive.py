"""Package archives: recognise a package's form by its bytes, check every member of an
archive, extract it safely.

A package is a build script, a directory holding `build.toml` (or `build.yaml`) and the files it
references, or that directory as a `.tar` or gzip-compressed tar (`.tar.gz`, `.tgz`). The form
is read from the bytes (gzip and ustar magic), not the name, so `pkg.bin` works too.

Archives are untrusted input: before anything is written, every member is checked and each
one that would land outside the package is refused by name: absolute names, `..`, hard links
leaving it, members reached through a symbolic link, device nodes and FIFOs, and symbolic links
pointing out of it. The one exception is a symbolic link *inside* a directory the script uses
as an `is_directory` overlay or as a volume: there the link is content of the image (or of the
container), resolved there and never followed on the host, so `/etc/localtime ->
/usr/share/zoneinfo/UTC` in an overlay directory is kept. Extraction then goes through Python's
`data` tar filter as a second line of defence, or, on Pythons older than 3.11.4 (Debian 12 has
3.11.2), through rfs's own member-by-member writer that applies the same rules.
"""

from __future__ import annotations

import enum
import gzip
import os
import posixpath
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import Problem, ScriptError, UsageError
from rfs.script.schema import SCRIPT_NAMES

_GZIP_MAGIC = b"\x1f\x8b"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# A build script is text of a few KiB; anything this large under that name is not one.
_MAX_SCRIPT_BYTES = 4 << 20


class PackageType(enum.Enum):
    """The four forms a package takes (the values are `rfs pack --type` names)."""

    BUILD_SCRIPT = "build-script"
    DIRECTORY = "directory"
    TAR = "tar"
    TAR_GZ = "tar-gz"

    @property
    def is_archive(self) -> bool:
        """True for the tarball forms."""
        return self in (PackageType.TAR, PackageType.TAR_GZ)


def detect(path: Path) -> PackageType:
    """The form of the package at `path`, judged by its content."""
    if path.is_dir():
        return PackageType.DIRECTORY
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head.startswith(_GZIP_MAGIC):
        return PackageType.TAR_GZ
    if head[257:262] == b"ustar":  # POSIX (and GNU) tar headers carry this magic
        return PackageType.TAR
    if path.name.endswith(_TAR_SUFFIXES):
        # Old v7 tarballs have no magic; anything else with a tar name is a mistake.
        if tarfile.is_tarfile(path):
            return PackageType.TAR
        raise UsageError(f"{path} is named like a tar archive but is not one")
    return PackageType.BUILD_SCRIPT


# -- reading archives ---------------------------------------------------------------------


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def member_path(name: str) -> str:
    """A member name without "./", doubled or trailing slashes ("" is the package root)."""
    return "/".join(_parts(name))


def _inside(base: str, path: str) -> bool:
    """Whether normalised `path` is `base` or below it (`base` "" is the root)."""
    return base == "" or path == base or path.startswith(base + "/")


@dataclass(frozen=True)
class _ScriptMember:
    prefix: str  # the package root inside the archive: "" or a single top-level directory
    member: tarfile.TarInfo


def _find_script(members: Sequence[tarfile.TarInfo]) -> _ScriptMember | None:
    """The build script member, at the top or under one top-level directory (`tar c pkg/`)."""
    by_name = {member_path(m.name): m for m in members if m.isreg()}
    for name in SCRIPT_NAMES:
        if name in by_name:
            return _ScriptMember("", by_name[name])
    tops = {_parts(m.name)[0] for m in members if _parts(m.name)}
    if len(tops) == 1:
        (top,) = tops
        for name in SCRIPT_NAMES:
            if f"{top}/{name}" in by_name:
                return _ScriptMember(top, by_name[f"{top}/{name}"])
    return None


def _content_dirs(tar: tarfile.TarFile, script: _ScriptMember, label: str) -> list[str]:
    """Directories whose symbolic links are image or container content (see the module doc)."""
    from rfs.script.document import parse_bytes
    from rfs.script.schema import collect_script

    if script.member.size > _MAX_SCRIPT_BYTES:
        return []
    f = tar.extractfile(script.member)
    if f is None:
        return []
    try:
        doc = parse_bytes(f.read(), Path(script.member.name).suffix, label)
        model, _ = collect_script(doc, file=label)
    except ScriptError:
        return []  # reported when the unpacked package is loaded
    refs = [o.source for o in model.overlays if o.is_directory and o.source]
    refs += [host for host, _ in model.container.volumes]
    return [posixpath.join(script.prefix, member_path(ref)) for ref in refs if member_path(ref)]


def check_members(
    members: Sequence[tarfile.TarInfo], content_dirs: Sequence[str] = ()
) -> tuple[list[tuple[str, str]], set[str]]:
    """Every member that would escape the package, as (member name, why).

    Also returns the symbolic links allowed to point out (inside `content_dirs`).
    """
    problems: list[tuple[str, str]] = []
    links = {member_path(m.name): m for m in members if m.issym()}
    allowed: set[str] = set()
    earlier: set[str] = set()  # a hard link can only point back (tarfile's rule)
    for m in members:
        name = member_path(m.name)
        target_known = member_path(m.linkname) in earlier
        earlier.add(name)
        parts = name.split("/") if name else []
        if m.name.startswith("/"):
            problems.append((m.name, "is an absolute path; package members must be relative"))
            continue
        if ".." in parts:
            problems.append((m.name, "leads outside the package ('..')"))
            continue
        through = next(
            (p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in links), None
        )
        if through is not None:
            problems.append(
                (m.name, f"lies beneath the symbolic link {through}, which could send it anywhere")
            )
            continue
        if m.issym():
            target = m.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                if any(d != name and _inside(d, name) for d in content_dirs):
                    allowed.add(name)
                else:
                    problems.append(
                        (m.name, f"is a symbolic link pointing out of the package (to {target})")
                    )
        elif m.islnk():
            target = member_path(m.linkname)
            if m.linkname.startswith("/") or ".." in target.split("/"):
                problems.append((m.name, f"is a hard link to {m.linkname}, outside the package"))
            elif not target_known:
                problems.append(
                    (
                        m.name,
                        f"is a hard link to {m.linkname}, which is not in the archive before it",
                    )
                )
        elif not (m.isreg() or m.isdir()):
            problems.append(
                (
                    m.name,
                    "is a device node, FIFO or other special file; a package "
                    "holds only files, directories and links",
                )
            )
    return problems, allowed


# Python 3.11.4 brought extraction filters (PEP 706); Debian 12's python3 is 3.11.2. Where they
# exist the `data` filter is the second line of defence; elsewhere `_extract_checked` is.
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


def _data_mode(mode: int) -> int:
    """The `data` filter's mode for a regular file: no setuid/setgid/sticky, no group/other
    write, no execute bits unless the owner has one, always readable and writable by the owner."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _extract_checked(
    tar: tarfile.TarFile,
    members: Sequence[tarfile.TarInfo],
    dest: Path,
    allowed: set[str],
    label: str,
) -> None:
    """Write `members` (all passed by `check_members`) under `dest` without tarfile's extractor.

    The names written are the normalised ones checked above, never the raw tar metadata. Nothing
    is written through a symbolic link: no member lies beneath one (checked), a member that
    replaces an earlier one removes it first, and files are opened with O_NOFOLLOW. Owners are
    ignored, modes limited as the `data` filter does. Like that filter, a link (other than the
    `allowed` ones, which are image content) whose target resolves out of `dest` on this host
    (a chain of inner links can do that) is refused by name.
    """
    root = os.path.realpath(dest)

    def outside(path: str) -> bool:
        return os.path.commonpath([os.path.realpath(path), root]) != root

    def clear(path: str) -> None:
        """Make room for a member: a later member of the same name replaces an earlier one."""
        if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
            os.unlink(path)

    dirs: list[tuple[str, int]] = []
    for m in members:
        name = member_path(m.name)
        path = os.path.join(root, name) if name else root
        if name:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if m.isdir():
            if name:
                clear(path)
                os.makedirs(path, exist_ok=True)
            dirs.append((path, int(m.mtime)))
        elif m.isreg():
            clear(path)
            src = tar.extractfile(m)
            if src is None:  # cannot happen for a regular member; refuse rather than guess
                raise ScriptError([Problem(m.name, "has no data in the archive", label)])
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _data_mode(m.mode)
            )
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                os.fchmod(out.fileno(), _data_mode(m.mode))  # the umask applied at creation
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        elif m.issym():
            if name not in allowed and (
                m.linkname.startswith("/")
                or outside(os.path.join(os.path.dirname(path), m.linkname))
            ):
                raise ScriptError(
                    [
                        Problem(
                            m.name,
                            f"is a symbolic link pointing out of the package (to {m.linkname})",
                            label,
                        )
                    ]
                )
            clear(path)
            os.symlink(m.linkname, path)
        elif m.islnk():
            target = os.path.join(root, member_path(m.linkname))
            if outside(target):
                raise ScriptError(
                    [Problem(m.name, f"is a hard link to {m.linkname}, outside the package", label)]
                )
            clear(path)
            os.link(target, path, follow_symlinks=False)
        else:  # refused by check_members already
            raise ScriptError(
                [
                    Problem(
                        m.name,
                        "is a device node, FIFO or other special file; "
                        "a package holds only files, directories and "
                        "links",
                        label,
                    )
                ]
            )
    for path, mtime in reversed(dirs):  # deepest last-written first, as tarfile does
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def extract(archive: Path, dest: Path) -> Path:
    """Unpack the package `archive` into the empty directory `dest`; return its root.

    The root is `dest` itself, or the single top-level directory holding the build script.
    Raises ScriptError naming every member that would escape, before writing anything.
    """
    label = str(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            script = _find_script(members)
            content = _content_dirs(tar, script, label) if script else []
            problems, allowed = check_members(members, content)
            if problems:
                raise ScriptError([Problem(name, why, label) for name, why in problems])
            if script is None:
                raise ScriptError(
                    [
                        Problem(
                            "",
                            "holds no build script ("
                            + ", ".join(SCRIPT_NAMES)
                            + ") at its top or in a single top-level directory",
                            label,
                        )
                    ]
                )

            if _HAS_DATA_FILTER:

                def only_safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                    if member_path(member.name) in allowed:  # checked above: inside a content dir
                        return tarfile.tar_filter(member, path).replace(
                            uid=os.getuid(), gid=os.getgid(), uname="", gname="", deep=False
                        )
                    return tarfile.data_filter(member, path)

                tar.extractall(dest, filter=only_safe)
            else:
                _extract_checked(tar, members, dest, allowed, label)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, KeyError) as exc:
        # KeyError: tarfile's word for a link whose target is missing (checked above too)
        filter_error = getattr(tarfile, "FilterError", None)  # Python >= 3.11.4 only
        if filter_error is not None and isinstance(exc, filter_error):
            raise ScriptError([Problem(exc.tarinfo.name, str(exc), label)]) from exc
        raise ScriptError([Problem("", f"is not a readable tar archive: {exc}", label)]) from exc
    return dest / script.prefix if script.prefix else dest
