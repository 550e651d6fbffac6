"""Patch the output ext4 image in place when it is the image rfs last wrote from the same base.

The copy route (rfs.fs.ext4) copies the whole cached base image and writes the overlays into
the copy with `debugfs -z UNDO -w`; the undo file keeps the base image's bytes of every block
debugfs wrote (superblock, group descriptors, bitmaps, inode tables, directories, data). When
the next build's output is still exactly that image (same inode, size, mtime and ctime as
recorded right after it was written), rfs does not copy again: `e2undo UNDO OUTPUT` turns the
output back into the base image's bytes, which is checked (the superblock block and every
block the undo file covers are compared with the base image), and the new patch is written
into it the same way, with a new undo file. The bytes are those the copy route makes: both
start from the base image's bytes and run the same debugfs script with an undo file.

The output is always a complete image when rfs exits. The rollback itself runs as
`e2undo -z REVERT ...`, so until the new image is complete the previous one can be restored
(`e2undo NEW_UNDO`, then `e2undo REVERT`). The tools run in their own session and with the
interrupt held back, so a Ctrl-C or SIGTERM lets the running tool finish and then restores
the previous image (with its mtime, so it is still recognised as built). A SIGKILL cannot be
handled: the marker file written before the first write and removed after the last one tells
the next build that the output may be half-patched, and it is rewritten by the copy route.

Every file lives in the cache directory the base-image cache gives for the base image
(`BaseImageCache.side_dir`), named after the output's path; it is dropped with the base image.
One lock file per output beside those directories makes two builds into one output take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import RfsError
from rfs.host import proc, signals
from rfs.host.hashing import digest_bytes

log = logging.getLogger("rfs.fs")

_UNDO_MAGIC = b"E2UNDO02"
_KEYBLOCK_MAGIC = 0xCADECADE
_HEADER = struct.Struct("<8sQQQII")  # magic, keys, super block, key block, block size, fs bs
_KEY = struct.Struct("<QII")  # fs block, crc32c, bytes
_KEYBLOCK_HEAD = 16  # magic, crc, reserved
# The primary superblock sits at byte 1024; with 4 KiB blocks it shares block 0 with the boot
# area. Compared after every rollback whatever the undo file says.
_HEAD_BYTES = 4096
_CHUNK = 1 << 20


class RollbackFailed(RfsError):
    """The output could not be turned back into the base image: take the copy route."""


def file_identity(path: Path) -> list[int] | None:
    """What changes whenever anyone writes, replaces, truncates or touches `path` (the path
    itself: a symlink put in its place has an identity of its own)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass(frozen=True)
class Slot:
    """The in-place state of one output image made from one base image, in the cache."""

    directory: Path  # BaseImageCache.side_dir(base key)
    output: Path  # resolved

    @classmethod
    def of(cls, directory: Path, output: Path) -> Slot:
        """The slot of `output` (any spelling of its directory) under `directory`."""
        return cls(directory, output.parent.resolve() / output.name)

    @property
    def name(self) -> str:
        """The file-name stem of this output's files: a digest of its path."""
        return digest_bytes(os.fsencode(self.output))[:32]

    def file(self, suffix: str) -> Path:
        """`state` (JSON), `undo` (the output's undo file), `next` (the undo file being
        written), `revert` (what the rollback overwrote) or `patching` (the crash marker)."""
        return self.directory / f"{self.name}.{suffix}"

    def clear(self) -> None:
        """Forget the output's in-place state here (all files)."""
        for suffix in ("state", "state.tmp", "patching", "undo", "next", "revert"):
            self.file(suffix).unlink(missing_ok=True)

    def clear_elsewhere(self) -> None:
        """Forget this output's state under every other base image's directory: the output
        is about to be replaced, so their undo files can never apply again."""
        parent = self.directory.parent
        if not parent.is_dir():
            return
        for other in parent.iterdir():  # (the outputs' lock files sit beside the directories)
            if other != self.directory and other.is_dir():
                Slot(other, self.output).clear()

    def usable(self) -> str | None:
        """None when the output is the image rfs last wrote here, with its undo file; else why
        the copy route is taken."""
        if self.file("patching").exists():
            return "an earlier in-place patch of the output did not finish"
        try:
            state = json.loads(self.file("state").read_text())
        except FileNotFoundError:
            return "rfs did not write the output from this base image"
        except (OSError, ValueError) as exc:
            return f"the in-place state is unreadable ({exc})"
        if not isinstance(state, dict) or state.get("output") != str(self.output):
            return "the in-place state names another output"
        if state.get("identity") != file_identity(self.output):
            return "the output changed since rfs wrote it"
        if self.output.lstat().st_nlink != 1:  # a copy kept by hard link must stay as it is
            return "the output has another hard link"
        if not self.file("undo").is_file():
            return "the undo file is missing"
        return None

    def commit(self, patch_digest: str) -> None:
        """Record that the output now holds the base image patched with `patch_digest`, and
        that `next` is its undo file."""
        os.replace(self.file("next"), self.file("undo"))
        state = {
            "output": str(self.output),
            "identity": file_identity(self.output),
            "patch": patch_digest,
        }
        tmp = self.file("state.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.file("state"))
        self.file("revert").unlink(missing_ok=True)
        self.file("patching").unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the output's lock (shared by every base image's slot of it): two builds into
        one output take turns, so neither rolls back an image the other is patching."""
        root = self.directory.parent
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def copy_route(self) -> Iterator[Path]:
        """Where the copy route's debugfs writes its undo file; the state is dropped first
        (the output is about to be replaced) and the caller commits after the rename."""
        self.clear_elsewhere()
        self.clear()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            yield self.file("next")
        except BaseException:
            self.file("next").unlink(missing_ok=True)
            raise


def undo_ranges(undo: Path, image_size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges of the image an e2fsprogs undo file restores; raise
    RollbackFailed if the file is not a well-formed undo file for an image of that size."""
    try:
        with undo.open("rb") as f:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise RollbackFailed(f"{undo} is too short for an undo file")
            magic, keys, _, key_block, block_size, _ = _HEADER.unpack(header)
            if magic != _UNDO_MAGIC or not 1024 <= block_size <= 1 << 16:
                raise RollbackFailed(f"{undo} is not an undo file")
            per_block = (block_size - _KEYBLOCK_HEAD) // _KEY.size
            ranges: list[tuple[int, int]] = []
            position = key_block
            while len(ranges) < keys:
                f.seek(position * block_size)
                block = f.read(block_size)
                if len(block) < block_size:
                    raise RollbackFailed(f"{undo} ends early")
                if struct.unpack_from("<I", block)[0] != _KEYBLOCK_MAGIC:
                    raise RollbackFailed(f"{undo} has a damaged key block")
                count = min(per_block, keys - len(ranges))
                data_blocks = 0
                for i in range(count):
                    fs_block, _, size = _KEY.unpack_from(block, _KEYBLOCK_HEAD + i * _KEY.size)
                    offset = fs_block * block_size
                    if size == 0 or offset + size > image_size:
                        raise RollbackFailed(f"{undo} covers bytes outside the image")
                    ranges.append((offset, size))
                    data_blocks += -(-size // block_size)
                position += 1 + data_blocks
    except OSError as exc:
        raise RollbackFailed(f"cannot read the undo file {undo}: {exc}") from exc
    return ranges


def same_bytes(image: Path, base: Path, ranges: list[tuple[int, int]]) -> bool:
    """Whether `image` equals `base` in its size, its first block and every range."""
    if image.stat().st_size != base.stat().st_size:
        return False
    with image.open("rb") as a, base.open("rb") as b:
        for offset, length in [(0, _HEAD_BYTES), *ranges]:
            done = 0
            while done < length:
                n = min(_CHUNK, length - done)
                if os.pread(a.fileno(), n, offset + done) != os.pread(b.fileno(), n, offset + done):
                    return False
                done += n
    return True


def _recorded(slot: Slot) -> object:
    """The output's identity as the in-place state recorded it."""
    try:
        return json.loads(slot.file("state").read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def roll_back(slot: Slot, base: Path) -> None:
    """Turn the output back into the base image's bytes with its undo file, keeping what the
    rollback overwrote in `revert`; raise RollbackFailed (output restored) if it cannot."""
    output, undo, revert = slot.output, slot.file("undo"), slot.file("revert")
    ranges = undo_ranges(undo, output.stat().st_size)
    revert.unlink(missing_ok=True)  # e2undo would add to an old one
    slot.file("patching").write_bytes(b"")
    try:
        proc.run(
            [proc.tool_path("e2undo"), "-z", str(revert), str(undo), str(output)],
            what="e2undo (rolling the output back to the base image)",
            shielded=True,
        )
    except RfsError as exc:
        # e2undo checks the undo file and the superblock before it writes anything; any
        # write would show in the output's mtime and ctime.
        if file_identity(output) == _recorded(slot):
            revert.unlink(missing_ok=True)
            slot.file("patching").unlink(missing_ok=True)
        else:
            restore(slot, None)
        raise RollbackFailed(str(exc)) from exc
    if not same_bytes(output, base, ranges):
        restore(slot, None)
        raise RollbackFailed("the rolled-back output differs from the base image")


def restore(slot: Slot, new_undo: Path | None) -> None:
    """Put the previous image back after an interrupted or failed in-place patch: undo the
    new patch (if `new_undo` was written), then the rollback. The marker stays if it fails,
    so the next build rewrites the output."""
    output = slot.output
    state_path = slot.file("state")
    state = json.loads(state_path.read_text())
    tool = proc.tool_path("e2undo")
    if new_undo is not None and new_undo.exists():
        proc.run(
            [tool, str(new_undo), str(output)],
            what="e2undo (removing the new patch)",
            shielded=True,
        )
        new_undo.unlink()
    proc.run(
        [tool, str(slot.file("revert")), str(output)],
        what="e2undo (restoring the previous image)",
        shielded=True,
    )
    # The previous bytes with the previous mtime (checked equal to the recorded identity
    # before the rollback): the build step that made them still recognises the output.
    os.utime(output, ns=(output.stat().st_atime_ns, int(state["identity"][3])))
    slot.file("revert").unlink(missing_ok=True)
    state["identity"] = file_identity(output)
    tmp = slot.file("state.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)
    slot.file("patching").unlink(missing_ok=True)


def patch_in_place(
    slot: Slot, base: Path, write: Callable[[Path], None], patch_digest: str
) -> bool:
    """Roll the output back to `base` and run `write(undo file)` (debugfs on the output);
    False, with the output untouched (or restored), when the copy route must be taken.
    An interrupt or a failure of `write` restores the previous image and is raised."""
    reason = slot.usable()
    if reason is not None:
        log.info("copying the base image: %s", reason)
        return False
    new = slot.file("next")
    new.unlink(missing_ok=True)  # debugfs would add to an old one
    try:
        roll_back(slot, base)
    except RollbackFailed as exc:
        log.info("copying the base image: %s", exc)
        return False
    except BaseException:
        _restore_or_leave(slot, None)
        raise
    try:
        write(new)
    except BaseException:
        _restore_or_leave(slot, new)
        raise
    with signals.deferred():  # the new image is complete: record it whole
        slot.commit(patch_digest)
    return True


def _restore_or_leave(slot: Slot, new_undo: Path | None) -> None:
    """Restore the previous image if the rollback began; if that fails, leave the marker (the
    next build rewrites the output) and let the first problem through."""
    if not slot.file("revert").exists():
        slot.file("patching").unlink(missing_ok=True)  # e2undo never started: untouched
        return
    try:
        restore(slot, new_undo)
    except (RfsError, OSError, ValueError, KeyError) as exc:
        log.warning("could not restore the previous image (%s); the next build rewrites it", exc)
