"""The adapter's `layer_diff`: what a command changed, read from the engine's overlay storage
where that is exact, else from `docker save` (see rfs.engine.layerdiff for the format)."""

from __future__ import annotations

import json
import logging
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from rfs.engine.apicalls import ApiCaller
from rfs.engine.base import BinarySink
from rfs.engine.layerdiff import (
    Limit,
    TooLarge,
    Unreadable,
    exports_as_committed,
    normalise_layer,
    write_upper_dir,
)
from rfs.errors import EngineError

log = logging.getLogger("rfs.engine")

_OVERLAY_DRIVERS = frozenset({"overlay2", "overlay"})


class DiffOps(ApiCaller):
    """Reading an image's top layer (mixed into `rfs.engine.docker_engine.DockerEngine`)."""

    name: str
    local: bool
    _root: str | None = None

    if TYPE_CHECKING:  # provided by PullOps and DockerEngine

        def _inspect_image(self, ref: str) -> dict[str, Any] | None: ...

        def save_image(self, ref: str, dest: BinarySink) -> None: ...

    def image_layers(self, ref: str) -> list[str]:
        """The diff IDs of `ref`'s layers, base first."""
        info = self._inspect_image(ref)
        if info is None:
            raise EngineError(f"cannot read the layers of {ref}: the image is missing")
        return _layers(info, ref)

    def layer_diff(self, image: str, dest: BinaryIO, limit: Limit, *, new_layer: bool) -> bool:
        """Write what the command committed as `image` changed (its top layer, normalised) to
        `dest`; False, with `dest` emptied, when that is more than `limit`. `new_layer` says
        whether the commit added a layer (Docker adds none for a command that changed
        nothing): without one the change is empty."""
        if not new_layer:
            with tarfile.open(fileobj=dest, mode="w:", format=tarfile.PAX_FORMAT):
                pass
            return True
        info = self._inspect_image(image)
        if info is None:
            raise EngineError(f"cannot read the layers of {image}: the image is missing")
        layers = _layers(info, image)
        upper = self._upper_dir(info) if self.local else None
        start = dest.tell()
        try:
            if upper is not None:
                try:
                    write_upper_dir(upper, dest, limit)
                    return True
                except Unreadable as exc:
                    log.info("reading the layer of %s from docker save: %s", image, exc)
                    dest.seek(start)
                    dest.truncate()
            self._from_save(image, len(layers), dest, limit)
            return True
        except TooLarge:
            dest.seek(start)
            dest.truncate()
            return False

    def exports_as_committed(self, cid: str, over: Limit | None) -> bool:
        """Whether the stopped container `cid` exports as the image it is committed as and,
        with `over`, what it changed holds more than `over`: told from its layer directory in
        the engine's overlay storage on this machine, reading no file (see
        rfs.engine.layerdiff.exports_as_committed); False when that cannot be told."""
        if not self.local:
            return False
        with self._calling(f"inspect container {cid[:12]}"):
            info = self._api.inspect_container(cid)
        upper = self._upper_dir(info) if isinstance(info, dict) else None
        init_layer = self.name == "docker"  # Podman has none (rfs.engine.layerdiff)
        return upper is not None and exports_as_committed(upper, over, init_layer=init_layer)

    def _upper_dir(self, info: dict[str, Any]) -> Path | None:
        """The top layer directory of an image (or the layer of a container), if the engine
        keeps it in overlay storage under its root directory on this machine (an answer
        naming anything else is not followed)."""
        driver = info.get("GraphDriver") or {}
        upper = (driver.get("Data") or {}).get("UpperDir")
        if driver.get("Name") not in _OVERLAY_DRIVERS or not isinstance(upper, str):
            return None
        if self._root is None:
            with self._calling("read the engine's storage directory"):
                found = self._api.info().get("DockerRootDir")
            self._root = os.path.realpath(found) if isinstance(found, str) and found else ""
        if not self._root:
            return None
        real = os.path.realpath(upper)
        if os.path.commonpath([real, self._root]) != self._root or not os.path.isdir(real):
            return None
        return Path(real)

    def _from_save(self, image: str, count: int, dest: BinaryIO, limit: Limit) -> None:
        """The top layer from `docker save`: slower (every layer is read), but any engine."""
        with tempfile.TemporaryFile() as saved:
            self.save_image(image, saved)
            saved.seek(0)
            try:
                with tarfile.open(fileobj=saved, mode="r:") as tar:
                    manifest = json.load(_member(tar, "manifest.json"))
                    names = manifest[0]["Layers"]
                    if not isinstance(names, list) or len(names) != count:
                        raise EngineError(f"the saved {image} lists {len(names)} layers")
                    with tempfile.TemporaryFile() as layer:
                        source = _member(tar, str(names[-1]))
                        while chunk := source.read(1 << 20):
                            layer.write(chunk)
                        layer.seek(0)
                        normalise_layer(layer, dest, limit)
            except (tarfile.TarError, ValueError, KeyError, IndexError, TypeError) as exc:
                raise EngineError(f"cannot read the saved image {image}: {exc}") from exc


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    found = tar.extractfile(name)
    if found is None:
        raise EngineError(f"the saved image has no file {name}")
    return found


def _layers(info: dict[str, Any], image: str) -> list[str]:
    layers = (info.get("RootFS") or {}).get("Layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise EngineError(f"the engine's answer for {image} lists no layers")
    return layers
