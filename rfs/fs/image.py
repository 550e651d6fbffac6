"""What every filesystem driver shares: the temporary image file, feeding the filtered stream to
a tool, the content scan, sizes, and the warnings about what a type cannot hold.

Every driver writes a temporary file next to the output and renames it over the output only
once the tool succeeded, so a failed or interrupted build leaves the previous image alone and
nothing else behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from rfs.errors import EnvironmentProblem, Problem, RfsError, ScriptError
from rfs.fs.tarstream import OverlayEntry, Selection, StreamStats, write_image_stream
from rfs.host import proc, signals

MIB = 1 << 20
# The free space rfs leaves in a writable image whose size the build script does not give:
# a quarter of what the content needs, and at least 16 MiB (room for logs, a package or two).
HEADROOM_FRACTION = 0.25
HEADROOM_MIN_MIB = 16

# Who gets told about what a filesystem type drops: the build's reporter (or a logger).
Warn = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """What an image is made of: the export, the selection, the overlays and the /etc fixes."""

    export_tar: Path
    selection: Selection
    overlays: Sequence[OverlayEntry]
    restore: Mapping[str, bytes] | None = None
    all_root: bool = False  # every entry owned by root (squashfs and erofs only)
    # Layer diffs laid on the export first (rfs.fs.layered): what later commands changed.
    layers: tuple[Path, ...] = ()

    def open_layers(self, stack: contextlib.ExitStack) -> list[BinaryIO]:
        """The layer tarballs, opened for reading until `stack` closes."""
        try:
            return [stack.enter_context(path.open("rb")) for path in self.layers]
        except OSError as exc:
            raise RfsError(f"cannot read a cached layer diff: {exc}") from exc


class BaseImageCache(Protocol):
    """Where a driver keeps base images (everything but the overlays) between builds; the
    build provides it over its store. See rfs.fs.ext4patch."""

    def key(self, identity: Mapping[str, object]) -> str:
        """The hex key of a base image made from the build's export and `identity`."""

    def seed(self, identity: Mapping[str, object]) -> bytes:
        """32 bytes for the UUID and hash seed of that base image: fixed by the export's key
        and `identity`, not by the export's bytes (their mtimes differ from run to run, and a
        clean build must make the same image)."""

    def get(self, key: str) -> Path | None:
        """The cached base image of `key`, checked intact, or None."""

    def put(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A path to write the base image of `key` to; kept only if the block succeeds."""

    def building(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Hold the right to make the base image of `key`: one maker at a time, in any process
        or thread (several images of one build can share a base image)."""

    def side_dir(self, key: str) -> Path:
        """A directory (maybe not made yet) for files kept with the base image of `key`: the
        undo files of images patched from it (rfs.fs.ext4inplace) and the export's parsed
        headers (rfs.fs.ext4patch.export_entries); it goes when that base image goes."""


@dataclass(frozen=True)
class Options:
    """How to make the image: the build script's `[filesystem]` settings and the build's seed."""

    seed: bytes  # 32 bytes from the assemble key: UUIDs, hash seeds
    source_date_epoch: int = 0
    size_mib: int | None = None
    block_size_mib: int | None = None
    mkfs_args: tuple[str, ...] = ()
    dd_args: tuple[str, ...] = ()
    base_images: BaseImageCache | None = None  # set: ext4 patches overlays into a cached base
    all_root: bool = False  # every owner root (the schema allows it for squashfs and erofs)


@dataclass
class Result:
    """What an assembly produced: the stream's statistics, the image size and the warnings."""

    stats: StreamStats
    size_mib: int  # the image file's size in MiB (rounded up for content-sized types)
    route: str  # how the image was made, for the record and the docs
    warnings: list[str] = field(default_factory=list)


def scan(source: Source, mtime: int) -> StreamStats:
    """Run the filter into /dev/null: what the image will hold, before any mkfs runs."""
    try:
        src = source.export_tar.open("rb")
    except OSError as exc:
        raise RfsError(f"cannot read the export tarball {source.export_tar}: {exc}") from exc
    with src, open(os.devnull, "wb") as sink, contextlib.ExitStack() as stack:
        return write_image_stream(
            src,
            source.selection,
            source.overlays,
            sink,
            mtime=mtime,
            restore=source.restore,
            all_root=source.all_root,
            layers=source.open_layers(stack),
        )


def with_headroom(need_mib: int, minimum_mib: int = 1, overhead_mib: int = 0) -> int:
    """The size of a writable image whose content needs `need_mib`, of which `overhead_mib` is
    the filesystem's own fixed reservation: see HEADROOM_*. Never below `minimum_mib`."""
    content = max(0, need_mib - overhead_mib)
    extra = max(HEADROOM_MIN_MIB, -(-content * int(HEADROOM_FRACTION * 100) // 100))
    return max(minimum_mib, need_mib + extra)


def check_size(fs_name: str, size_mib: int, need_mib: int, stats: StreamStats) -> None:
    """Refuse, before mkfs runs, a size below what the content needs (naming what it needs)."""
    if size_mib >= need_mib:
        return
    message = (
        f"{size_mib} MiB is too small for this {fs_name} image: the content needs about "
        f"{need_mib} MiB ({stats.inodes} files, directories and links; "
        f"{stats.content_bytes / MIB:.1f} MiB of file data)"
    )
    raise ScriptError(
        [Problem("filesystem.size_mib", message)], hint=f"set size_mib to {need_mib} or more"
    )


def settle_size(
    fs_name: str,
    source: Source,
    options: Options,
    need_mib: Callable[[StreamStats], int],
    *,
    mtime: int,
    minimum_mib: int = 1,
    overhead_mib: int = 0,
) -> tuple[StreamStats, int]:
    """Scan `source` and decide the size of a writable image: the script's `size_mib` (refused
    if the content needs more) or what the content needs plus headroom. Also checks
    `block_size_mib`. Returns the scan's statistics and the size in MiB."""
    stats = scan(source, mtime)
    need = need_mib(stats)
    size = options.size_mib
    if size is None:
        size = with_headroom(need, minimum_mib, overhead_mib)
    check_size(fs_name, size, need, stats)
    check_block_size(options, size)
    return stats, size


def check_block_size(options: Options, size_mib: int) -> None:
    """`block_size_mib` (buildfs: dd's block size) must divide the image size."""
    block = options.block_size_mib
    if block is not None and size_mib % block:
        raise ScriptError(
            [Problem("filesystem.block_size_mib", f"{block} does not divide the size {size_mib}")]
        )


@contextlib.contextmanager
def temp_image(output: Path, size_mib: int | None) -> Iterator[Path]:
    """A temporary file next to `output` (sparse, `size_mib` long if given), renamed over
    `output` when the block succeeds and removed when it fails."""
    output = Path(output)
    if not output.parent.is_dir():
        raise EnvironmentProblem(f"the output directory {output.parent} does not exist")
    tmp: Path | None = None
    try:
        # A Ctrl-C or SIGTERM while the file is made would leave it unknown to the cleanup
        # below (seen under load): it is handled once `tmp` names the file.
        with signals.deferred():
            try:
                # The pid lets a later build remove it if this process is killed.
                prefix = f".{output.name}.rfs-tmp-{os.getpid()}-"
                fd, name = tempfile.mkstemp(dir=output.parent, prefix=prefix)
            except OSError as exc:
                raise EnvironmentProblem(f"cannot create a file in {output.parent}: {exc}") from exc
            tmp = Path(name)
        try:
            os.fchmod(fd, 0o644)
            if size_mib is not None:
                os.ftruncate(fd, size_mib * MIB)  # sparse: the tools write only what they use
        except OSError as exc:
            raise EnvironmentProblem(f"cannot size the image file {tmp}: {exc}") from exc
        finally:
            os.close(fd)
        yield tmp
        try:
            os.replace(tmp, output)
        except OSError as exc:
            raise RfsError(f"cannot put the image at {output}: {exc}") from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def copy_sparse(source: Path, target: Path) -> None:
    """Copy an image file without writing its holes (a reflink where the filesystem can).

    The images rfs makes are sparse files whose holes are all their zeros (mke2fs writes no
    zeros into a new file), so cp's own hole detection keeps them and copies the data with
    copy_file_range: 0.7 s for the edits benchmark's 2 GiB image holding 1.5 GiB, against 3.6 s
    with `--sparse=always`, which reads every block to look for zeros."""
    try:
        proc.run(
            [
                proc.tool_path("cp"),
                "--sparse=auto",
                "--reflink=auto",
                "--",
                str(source),
                str(target),
            ],
            what="cp (copying the base image)",
        )
    except RfsError as exc:
        if "No space left on device" in exc.message:
            raise EnvironmentProblem(
                f"no space left on the disk that holds the image: {exc.message}"
            ) from exc
        raise


def pad_to(path: Path, size_mib: int | None, fs_name: str, stats: StreamStats) -> int:
    """Extend a content-sized image (squashfs, erofs) to `size_mib` MiB, sparsely; refuse it
    when the image is already larger. Returns the final size in MiB (rounded up)."""
    actual = path.stat().st_size
    need = -(-actual // MIB)
    if size_mib is None:
        if actual % 4096:  # whole 4 KiB blocks: block devices and loop mounts want them
            os.truncate(path, -(-actual // 4096) * 4096)
        return need
    check_size(fs_name, size_mib, need, stats)
    os.truncate(path, size_mib * MIB)
    return size_mib


def feed(
    argv: Sequence[str],
    source: Source,
    *,
    mtime: int,
    what: str,
    env: Mapping[str, str] | None = None,
    clamp_mtime: int | None = None,
) -> StreamStats:
    """Run `argv` with the filtered stream on its stdin; raise with its message on failure."""
    try:
        src = source.export_tar.open("rb")
    except OSError as exc:
        raise RfsError(f"cannot read the export tarball {source.export_tar}: {exc}") from exc
    with src, contextlib.ExitStack() as stack:
        layers = source.open_layers(stack)
        process = proc.popen(argv, env=env)
        assert process.stdin is not None
        with contextlib.suppress(OSError):  # fewer context switches; the default is 64 KiB
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, MIB)
        pipe = open(process.stdin.fileno(), "wb", buffering=MIB, closefd=False)  # noqa: SIM115
        stats: StreamStats | None = None
        try:
            stats = write_image_stream(
                src,
                source.selection,
                source.overlays,
                pipe,
                mtime=mtime,
                restore=source.restore,
                clamp_mtime=clamp_mtime,
                all_root=source.all_root,
                layers=layers,
            )
        except BrokenPipeError:
            pass  # the tool stopped reading: its exit status and message say why
        except BaseException:
            process.kill()
            with contextlib.suppress(OSError):
                pipe.close()
            process.communicate()
            raise
        with contextlib.suppress(OSError):
            pipe.close()
    proc.finish(process, what)
    if stats is None:
        raise RfsError(f"{what} stopped reading the image content but reported success")
    return stats


@dataclass
class Piped:
    """The read end of the filtered stream; `stats` is set once the block has ended."""

    reader: BinaryIO
    stats: StreamStats = field(default_factory=StreamStats)


@contextlib.contextmanager
def stream_pipe(source: Source, *, mtime: int, clamp_mtime: int | None) -> Iterator[Piped]:
    """The filtered stream as a readable pipe, written by a thread (for in-process readers).

    After the block, the thread is joined and any error it met is raised. The reader must read
    to the end of the archive (or leave the block by an exception, which unblocks the writer).
    """
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):  # 64 KiB pipes cost a thread switch per 64 KiB
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4 * MIB)
    errors: list[BaseException] = []
    done: list[StreamStats] = []

    def write() -> None:
        try:
            with (
                open(write_fd, "wb", buffering=MIB) as out,
                source.export_tar.open("rb") as src,
                contextlib.ExitStack() as stack,
            ):
                done.append(
                    write_image_stream(
                        src,
                        source.selection,
                        source.overlays,
                        out,
                        mtime=mtime,
                        restore=source.restore,
                        clamp_mtime=clamp_mtime,
                        all_root=source.all_root,
                        layers=source.open_layers(stack),
                    )
                )
        except BrokenPipeError:
            pass
        except BaseException as exc:  # handed to the reading thread
            errors.append(exc)

    thread = threading.Thread(target=write, name="rfs-stream", daemon=True)
    reader = open(read_fd, "rb", buffering=MIB)  # noqa: SIM115
    thread.start()
    piped = Piped(reader)
    try:
        yield piped
        # Drain what is left (the end-of-archive blocks) so the writer can finish.
        while reader.read(MIB):
            pass
    finally:
        reader.close()  # a writer still blocked gets EPIPE and stops
        thread.join()
    if errors:
        raise errors[0]
    if not done:
        raise RfsError("the image stream stopped early")
    piped.stats = done[0]
