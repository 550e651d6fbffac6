"""A run step's layer image, between the engine and a remote record.

Upload: `docker save` writes a tarball; rfs keeps only what identifies the image, the config
(whose sha256 is the image ID) and the layer tarballs it lists (`rootfs.diff_ids`), each one
inline when small, else an object. The tarball's own `manifest.json` and `repositories` (tags)
are not sent.

Download: rfs writes a `docker load` tarball itself: the config, each layer under a name rfs
chooses, and a manifest.json with no RepoTags, so loading it can tag nothing; each layer is
checked against its diff_id while it is written, before the engine sees any of it. The caller
then checks the engine has the image ID and tags it with the layer tag, the only tag it sets.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from rfs.errors import RemoteCacheError
from rfs.remote.codec import CHUNK, INLINE_MAX, BadObject, ObjectRef, open_unpacked
from rfs.remote.record import LayerPart, Record, b64

_MAX_MANIFEST = 1 << 20  # a docker save manifest.json is a few hundred bytes per image


def _resolve(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """The regular-file member `name` names, following the archive's own links (docker save
    links a layer it already wrote)."""
    member = tar.getmember(name)
    for _ in range(16):
        if member.isfile():
            return member
        if member.issym():
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(member.name), member.linkname)
            )
        elif member.islnk():
            target = member.linkname
        else:
            break
        member = tar.getmember(target)
    raise RemoteCacheError(f"the saved image's member {name!r} is not a file")


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise RemoteCacheError(f"the saved image's {member.name} is unexpectedly large")
    data = tar.extractfile(member)
    assert data is not None  # a regular file
    return data.read()


def describe_layer(
    tarball: Path, image_id: str, put: Callable[[IO[bytes], int], ObjectRef]
) -> dict[str, Any]:
    """The record part of the image saved in `tarball` (large layers go through `put`)."""
    try:
        with tarfile.open(tarball, mode="r:") as tar:
            manifest = json.loads(_read(tar, _resolve(tar, "manifest.json"), _MAX_MANIFEST))
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise RemoteCacheError("the saved image's manifest.json lists more than one image")
            entry = manifest[0]
            config = _read(tar, _resolve(tar, str(entry["Config"])), INLINE_MAX * 64)
            if "sha256:" + hashlib.sha256(config).hexdigest() != image_id:
                raise BadObject(f"the saved image's config is not image {image_id[:19]}")
            layers: list[dict[str, Any]] = []
            for name in entry["Layers"]:
                member = _resolve(tar, str(name))
                if member.size <= INLINE_MAX:
                    layers.append(
                        {"size": member.size, "data": b64(_read(tar, member, INLINE_MAX))}
                    )
                else:
                    data = tar.extractfile(member)
                    assert data is not None
                    layers.append({"size": member.size, "object": put(data, member.size).to_json()})
    except (KeyError, TypeError, ValueError, tarfile.TarError) as exc:
        raise RemoteCacheError(
            f"the engine saved an image tarball rfs cannot read: {type(exc).__name__}: {exc}"
        ) from exc
    return {"config": b64(config), "layers": layers}


class _Checked:
    """A reader of one layer that counts and hashes what passes, and never gives more than
    the recorded size (a decompression bomb stops there)."""

    def __init__(self, reader: IO[bytes], size: int) -> None:
        self.reader = reader
        self.left = size
        self.sha256 = hashlib.sha256()

    def read(self, n: int = CHUNK) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.reader.read(n) if n else b""
        self.left -= len(data)
        self.sha256.update(data)
        return data


def write_load_tarball(record: Record, objects: Mapping[ObjectRef, Path], dest: IO[bytes]) -> None:
    """Write the `docker load` tarball of a run record's image to `dest`; raise BadObject if
    a layer is not what the record's image config says (its diff_id)."""
    image_hex = str(record.fields["image_id"])[7:]
    config_name = f"{image_hex}.json"
    names: list[str] = []
    with tarfile.open(fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, config_name, record.config)
        for part in record.layers:
            name = f"{part.diff_id}.tar"
            if name not in names:
                _add_layer(tar, name, part, objects)
            names.append(name)
        manifest = [{"Config": config_name, "RepoTags": [], "Layers": names}]
        _add(tar, "manifest.json", json.dumps(manifest).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_layer(
    tar: tarfile.TarFile, name: str, part: LayerPart, objects: Mapping[ObjectRef, Path]
) -> None:
    if part.data is not None:  # checked against its digest when the record was decoded
        _add(tar, name, part.data)
        return
    assert part.ref is not None
    info = tarfile.TarInfo(name)
    info.size = part.size
    info.mode = 0o644
    with open_unpacked(objects[part.ref]) as reader:
        checked = _Checked(reader, part.size)
        try:
            tar.addfile(info, checked)
        except OSError as exc:  # tarfile: "unexpected end of data"
            raise BadObject(f"layer {image_label(part)} is shorter than recorded") from exc
        if reader.read(1):
            raise BadObject(f"layer {image_label(part)} is longer than recorded")
    if checked.sha256.hexdigest() != part.diff_id:
        raise BadObject(f"layer {image_label(part)} does not match its digest")


def image_label(part: LayerPart) -> str:
    """A short name of a layer for messages."""
    return f"sha256:{part.diff_id[:12]}…"
