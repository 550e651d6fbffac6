"""Remote cache pieces that need no server: codecs, scopes, settings, and time-outs against a
real (silent or refusing) socket on loopback."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from rfs.errors import RemoteCacheError, UsageError
from rfs.host.sparse import data_extents
from rfs.remote import open_backend
from rfs.remote.base import record_names, scoped_name
from rfs.remote.codec import (
    BadObject,
    ObjectRef,
    decode_sparse,
    encode_sparse,
    open_unpacked,
    packing,
    unpack,
    verify_object,
)
from rfs.remote.config import RemoteSettings, remote_settings
from rfs.remote.layers import describe_layer, write_load_tarball
from rfs.remote.record import Wanted, decode_record, encode_record
from tests.tarmembers import member_bytes

KEY = "ab" * 32


def pack_bytes(tmp: Path, data: bytes, name: str) -> tuple[Path, ObjectRef]:
    with packing(tmp) as (sink, finish):
        sink.write(data)
        path, ref = finish()
        kept = tmp / name
        kept.write_bytes(path.read_bytes())
    return kept, ref


def test_objects_round_trip_and_corruption_is_caught(tmp_path: Path) -> None:
    data = b"layer data " * 10000
    path, ref = pack_bytes(tmp_path, data, "obj")
    assert ref.size == path.stat().st_size < len(data)
    verify_object(path, ref)
    out = io.BytesIO()
    unpack(path, out, limit=len(data))
    assert out.getvalue() == data
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BadObject, match="blake3"):
        verify_object(path, ref)
    path.write_bytes(bytes(raw[:10]))
    with pytest.raises(BadObject, match="truncated"):
        verify_object(path, ref)


def test_sparse_images_travel_without_their_holes(tmp_path: Path) -> None:
    image = tmp_path / "image"
    with image.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"superblock" * 100)
        f.seek(40 << 20)
        f.write(b"\x01" * 5000)
    extents = data_extents(image)
    assert sum(n for _, n in extents) < 1 << 20  # only the written blocks
    with packing(tmp_path) as (sink, finish):
        encode_sparse(image, sink)
        path, ref = finish()
        assert ref.size < 64 * 1024
        copy = tmp_path / "copy"
        with open_unpacked(path) as reader:
            decode_sparse(reader, copy, image.stat().st_size)
    assert copy.read_bytes() == image.read_bytes()
    assert copy.stat().st_blocks * 512 < 4 << 20  # still sparse


def _saved_image(path: Path, layers: list[bytes], tags: list[str]) -> str:
    """A `docker save`-like tarball of an image with `layers`; return its image ID."""
    diff_ids = [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    image_id = f"sha256:{hashlib.sha256(config).hexdigest()}"
    names = [f"l{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": f"{image_id[7:]}.json", "RepoTags": tags, "Layers": names}]
    with tarfile.open(path, "w") as tar:
        files = {
            f"{image_id[7:]}.json": config,
            "manifest.json": json.dumps(manifest).encode(),
            "repositories": b"{}",
            **dict(zip(names, layers, strict=True)),
        }
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return image_id


def test_layers_travel_as_config_and_checked_layers_never_as_tags(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1000  # large: an object; the small layer stays inline
    src = tmp_path / "image.tar"
    image_id = _saved_image(src, [big, b"small layer"], ["rfs-test/busybox:1"])
    stored: dict[ObjectRef, Path] = {}

    def put(data: IO[bytes], size: int) -> ObjectRef:
        path, ref = pack_bytes(tmp_path, data.read(), f"o{len(stored)}")
        stored[ref] = path
        return ref

    part = describe_layer(src, image_id, put)
    assert "object" in part["layers"][0] and "data" in part["layers"][1]
    wanted = Wanted(KEY, "", KEY, "run", "run[0]")
    data = encode_record(
        {"layer": part, "fields": {"image_id": image_id, "etc_written": {}, "new_layer": True}},
        wanted,
        None,
    )
    record = decode_record(data, wanted)
    out = io.BytesIO()
    write_load_tarball(record, stored, out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        manifest = json.loads(member_bytes(tar, "manifest.json"))
        assert manifest[0]["RepoTags"] == []  # loading it tags nothing
        assert sorted(tar.getnames()) == sorted(
            [
                f"{image_id[7:]}.json",
                "manifest.json",
                *{f"{hashlib.sha256(d).hexdigest()}.tar" for d in (big, b"small layer")},
            ]
        )
    # A layer object that decompresses to other bytes (same size) is refused.
    bad, _ = pack_bytes(tmp_path, big[::-1], "bad")
    with pytest.raises(BadObject, match="does not match its digest"):
        write_load_tarball(record, {next(iter(stored)): bad}, io.BytesIO())


def test_scopes_read_their_own_then_the_default() -> None:
    assert record_names(KEY, None) == [KEY]
    names = record_names(KEY, "feature/x")
    assert names[1] == KEY and names[0] == scoped_name(KEY, "feature/x") != KEY
    assert len(names[0]) == 64 and scoped_name(KEY, "other") != names[0]


def _args(**kw: object) -> argparse.Namespace:
    base = {"cache_from": None, "cache_to": None, "cache_scope": None, "cache_strict": None}
    return argparse.Namespace(**{**base, **kw})


def test_settings_flags_beat_environment_beat_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(
        '[cache]\nfrom = ["http://file/"]\nto = "oci://reg/x"\nstrict = true\ntimeout = 5\n'
    )
    env = {"RFS_CONFIG": str(conf)}
    s = remote_settings(_args(), env)
    assert s.sources == ("http://file/",) and s.target == "oci://reg/x" and s.strict
    assert s.timeout_s == 5 and s.read_urls() == ["http://file/", "oci://reg/x"]
    env["RFS_CACHE_FROM"] = "http://env1/ http://env2/"
    env["RFS_CACHE_STRICT"] = "0"
    s = remote_settings(_args(), env)
    assert s.sources == ("http://env1/", "http://env2/") and not s.strict
    s = remote_settings(_args(cache_from=["https://flag/"], cache_scope="main"), env)
    assert s.sources == ("https://flag/",) and s.scope == "main"
    with pytest.raises(UsageError, match="not a remote cache URL"):
        remote_settings(_args(cache_to="ftp://x/"), env)
    conf.write_text("[cache]\nfrm = 1\n")
    with pytest.raises(UsageError, match="unknown setting"):
        remote_settings(_args(), env)


def test_silent_server_times_out_within_bounds() -> None:
    """A server that accepts and never answers: bounded by timeout x (1 + retries)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        settings = RemoteSettings(timeout_s=0.3, connect_timeout_s=0.3, retries=1)
        for url in (f"http://127.0.0.1:{port}/", f"oci://127.0.0.1:{port}/rfs/cache"):
            backend = open_backend(url, settings)
            t0 = time.monotonic()
            with pytest.raises(RemoteCacheError, match="timed out"):
                backend.get_record(KEY)
            assert time.monotonic() - t0 < 3
            backend.close()
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("what", ["record", "object"])
def test_a_trickled_answer_is_given_up_at_its_deadline(what: str, tmp_path: Path) -> None:
    """A server sending a record or an object one byte at a time, each inside the read
    time-out: the deadline (a record's: 4 x the time-out; an object's: that plus its size at
    1 MiB/s) ends the read while most of it is still unsent."""
    from rfs.remote.codec import ObjectRef
    from tests.hostileserver import FakeCache, Handler

    body = b"{" + b" " * 398 + b"}" if what == "record" else bytes(range(256)) * 16
    sent: list[int] = []
    cut = threading.Event()

    def hook(handler: Handler, kind: str, name: str) -> bool:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for i in range(len(body)):
                handler.wfile.write(body[i : i + 1])
                handler.wfile.flush()
                sent.append(i)
                if cut.wait(0.05):
                    break
        except OSError:
            pass
        handler.close_connection = True
        return True

    server = FakeCache()
    server.hook = hook
    try:
        backend = open_backend(server.url, RemoteSettings(timeout_s=0.25, retries=0))
        with pytest.raises(RemoteCacheError, match="took more than"):
            if what == "record":
                backend.get_record(KEY)
            else:
                ref = ObjectRef(hashlib.sha256(body).hexdigest(), "0" * 64, len(body))
                backend.get_object(ref, tmp_path / "object")
        unsent = len(body) - len(sent)
        backend.close()
    finally:
        cut.set()
        server.stop()
    assert unsent > len(body) // 2, f"the reader waited for {len(sent)} of {len(body)} bytes"


def test_refused_connection_is_a_remote_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = open_backend(f"http://127.0.0.1:{port}/", RemoteSettings(retries=1))
    with pytest.raises(RemoteCacheError, match="connection refused"):
        backend.get_record(KEY)
