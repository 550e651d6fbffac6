"""The store as the ext4 driver's cache of base images (`rfs.fs.image.BaseImageCache`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from rfs.run.store import Blob, Store


def file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime) of `path`: any rewrite of it shows here."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class BaseImages:
    """The store as the ext4 driver's cache of base images (rfs.fs.image.BaseImageCache).

    A base image is keyed by the export's key and the settings the driver names; it is a
    local-only entry of kind "ext4-base" (never uploaded: the final image is), verified like
    an export, evicted like any entry.
    """

    def __init__(
        self,
        store: Store,
        export_key: str,
        export_digest: str,
        *,
        verify: Callable[[str, Blob], bool],
        no_cache: bool = False,
        verified: dict[str, tuple[int, int, int]] | None = None,
    ) -> None:
        self.store = store
        self.export_key = export_key
        self._verify = verify  # the executor's check: each blob rehashed once per build
        self.no_cache = no_cache  # rfs build --no-cache: use only base images made now
        self._verified = verified if verified is not None else {}
        # By the export's content, not its key: a step forced to run again (--rebuild, a
        # stale command) makes new bytes under the same key.
        self.export_digest = export_digest
        self._made: set[str] = set()  # base images this build made (--no-cache uses these)

    def key(self, identity: Mapping[str, object]) -> str:
        """The key of the base image of this export with `identity`."""
        from rfs.graph.codeversion import code_version
        from rfs.host.hashing import digest_json

        key = digest_json(
            {"export": self.export_digest, "code": code_version("assemble"), **identity}
        )
        self.store.hold({key})
        return key

    def seed(self, identity: Mapping[str, object]) -> bytes:
        """The UUID and hash seed of the base image of this export with `identity`: by the
        export's key (its bytes differ between equal builds only in what the image clamps)."""
        from rfs.graph.codeversion import code_version
        from rfs.host.hashing import digest_json

        return bytes.fromhex(
            digest_json({"export": self.export_key, "code": code_version("assemble"), **identity})
        )[:32]

    def get(self, key: str) -> Path | None:
        """The verified base image of `key`, or None (a damaged one is dropped; with
        `--no-cache` none is used, and the new one replaces it)."""
        if self.no_cache and key not in self._made:
            return None
        blob = self.store.blob(key)
        if blob is None:
            return None
        if not self._verify(key, blob):
            self.store.drop(key)
            return None
        self.store.touch(key)
        return blob.path

    def side_dir(self, key: str) -> Path:
        """Where the files kept with base image `key` live (undo files, the export's parsed
        headers); Store.drop removes the directory with the base image."""
        return self.store.side_dir(key)

    def building(self, key: str) -> contextlib.AbstractContextManager[None]:
        """The build lock of base image `key` (rfs.run.store.Store.building)."""
        return self.store.building(key)

    @contextlib.contextmanager
    def put(self, key: str) -> Iterator[Path]:
        """Where the driver writes a new base image; recorded once complete."""
        from rfs.host.hashing import digest_sparse_file

        with self.store.blob_file(key) as tmp:
            yield tmp
            digest = digest_sparse_file(tmp)
            size = tmp.stat().st_size
        self._made.add(key)
        self.store.put_record(
            key,
            {
                "kind": "ext4-base",
                "export": self.export_key,
                "blob_size": size,
                "blob_digest": digest,
                "blob_sparse": True,
            },
        )
        self.store.remember_verified(key, digest)
        with contextlib.suppress(OSError):  # hashed just now: no need to again this build
            self._verified[key] = file_identity(self.store.root / "blobs" / key)
