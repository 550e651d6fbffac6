"""Remote records on the wire: a short header (format, signatures), then a JSON body.

    rfs-remote-2\\n
    sig NAME:BASE64\\n            zero or more (rfs.remote.signing)
    \\n
    {"name": …, "scope": …, "key": …, "kind": …, "step": …, "fields": {…}, <kind part>}

`decode_record` is the only way a server's bytes become a `Record`: it checks the signature
first (when keys are trusted), then every field against a fixed schema, so whatever a server
sends ends as a `Record` or as `BadRecord` (a miss), never as another exception, and nothing
later reads a field the decoder did not check. A record whose name, scope, key, kind or step
is not the one asked for is a miss even without signatures.

Kind parts (object references: rfs.remote.codec.ObjectRef):
    run       "layer": {"config": BASE64, "layers": [{"size": N, "data": BASE64} or
                        {"size": N, "object": REF}, …]}   one entry per config rootfs diff_id
    export    "export": {"object": REF}
    diff      "diff": {"object": REF}   a command's layer diff, or its layer's export (anchor)
    assemble  "image": {"object": REF, "size": N, "blake3": HEX}
    overlays  nothing
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rfs.remote.base import MAX_RECORD_BYTES
from rfs.remote.codec import HEX64, MAX_OBJECT_BYTES, BadObject, ObjectRef
from rfs.remote.signing import SIG_LINE, PublicKey, SecretKey, check_signatures, signed_message
from rfs.run.etcfiles import MANAGED

FORMAT = b"rfs-remote-2"
MAX_SIGNATURES = 8
_STEP_ID = re.compile(r"[a-z]+(\[[0-9]{1,6}\])?")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_PART = {
    "run": "layer",
    "export": "export",
    "diff": "diff",
    "assemble": "image",
    "overlays": None,
}
_FIELDS = {
    "run": {"image_id", "etc_written", "new_layer"},
    "export": {"blob_size", "blob_digest", "etc_written"},
    "diff": {"blob_size", "blob_digest", "etc_written", "anchor", "chain"},
    "assemble": set(),
    "overlays": {"overlays"},
}


class BadRecord(BadObject):
    """A record that is malformed, for another step, or not signed by a trusted key: a miss."""


class Untrusted(BadRecord):
    """A record that is unsigned, signed by a key not trusted, or altered since it was signed."""


@dataclass(frozen=True)
class Wanted:
    """The record a reader asked for: what a record must say it is (and what is signed)."""

    name: str
    scope: str  # "" for the default scope
    key: str
    kind: str
    step: str


@dataclass(frozen=True)
class LayerPart:
    """One layer of a run step's image, in the order of its config's rootfs.diff_ids."""

    diff_id: str  # sha256 hex of the uncompressed layer tarball
    size: int  # bytes of the uncompressed layer tarball
    data: bytes | None = None  # small layers travel inside the record
    ref: ObjectRef | None = None  # the others are objects (zstd)


@dataclass(frozen=True)
class Record:
    """A decoded, checked record."""

    kind: str
    fields: dict[str, Any]  # the local record fields (etc_written values as bytes)
    config: bytes = b""  # run: the image config; its sha256 is fields["image_id"]
    layers: tuple[LayerPart, ...] = ()
    ref: ObjectRef | None = None  # export, assemble
    image_size: int = 0  # assemble: the image file's size and blake3
    image_blake3: str = ""
    signer: str | None = None
    objects: tuple[ObjectRef, ...] = field(default=())


def encode_record(body: dict[str, Any], wanted: Wanted, sign_key: SecretKey | None) -> bytes:
    """The bytes of a record (the body gets the identity fields of `wanted`)."""
    body = {
        **body,
        "name": wanted.name,
        "scope": wanted.scope,
        "key": wanted.key,
        "kind": wanted.kind,
        "step": wanted.step,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    header = [FORMAT]
    if sign_key is not None:
        header.append(
            sign_key.sign_line(signed_message(wanted.name, wanted.scope, wanted.key, text))
        )
    return b"\n".join(header) + b"\n\n" + text


def b64(data: bytes) -> str:
    """Bytes as a record carries them."""
    return base64.b64encode(data).decode()


def decode_record(data: bytes, wanted: Wanted, trusted: Sequence[PublicKey] = ()) -> Record:
    """The record in `data` if it is well formed, is the one `wanted`, and (with `trusted`
    keys) carries a trusted key's signature; else BadRecord (Untrusted for signatures)."""
    where = f"the record of {wanted.step}"
    try:
        return _decode(data, wanted, trusted, where)
    except BadRecord:
        raise
    except (ValueError, TypeError, KeyError, RecursionError, AttributeError) as exc:
        # The schema checks below leave none of these, but a miss is the only safe answer.
        raise BadRecord(f"{where} is malformed ({type(exc).__name__})") from exc


def _decode(data: bytes, wanted: Wanted, trusted: Sequence[PublicKey], where: str) -> Record:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise BadRecord(f"{where} is too large")
    header, sep, body = data.partition(b"\n\n")
    lines = header.split(b"\n")
    if not sep or lines[0] != FORMAT:
        first = lines[0][:40].decode("ascii", "replace")
        raise BadRecord(f"{where} has an unknown format ({first!r}; rfs reads {FORMAT.decode()})")
    if len(lines) - 1 > MAX_SIGNATURES:
        raise BadRecord(f"{where} has too many signatures")
    signatures: list[tuple[str, bytes]] = []
    for line in lines[1:]:
        m = SIG_LINE.fullmatch(line)
        if m is None:
            raise BadRecord(f"{where} has a malformed header line")
        raw = base64.b64decode(m.group(2))
        if base64.b64encode(raw) != m.group(2):  # spare bits set: not the signer's bytes
            raise BadRecord(f"{where} has a malformed signature")
        signatures.append((m.group(1).decode(), raw))
    signer = None
    if trusted:
        # Before the body is even parsed: with trusted keys, only signed bytes are read.
        signer, why = check_signatures(
            signatures, trusted, signed_message(wanted.name, wanted.scope, wanted.key, body)
        )
        if signer is None:
            raise Untrusted(f"{where}: {why}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRecord(f"{where} is not JSON") from exc
    if not isinstance(doc, dict):
        raise BadRecord(f"{where} is not a JSON object")
    claimed = {k: doc.get(k) for k in ("name", "scope", "key", "kind", "step")}
    if claimed != {
        "name": wanted.name,
        "scope": wanted.scope,
        "key": wanted.key,
        "kind": wanted.kind,
        "step": wanted.step,
    }:
        raise BadRecord(f"{where} is for another step (it names {_label(claimed)})")
    kind = wanted.kind
    if kind not in _PART or not _STEP_ID.fullmatch(wanted.step):
        raise BadRecord(f"{where}: kind {kind!r} is not stored remotely")
    part = _PART[kind]
    expected = {"name", "scope", "key", "kind", "step", "fields"} | ({part} if part else set())
    if set(doc) != expected:
        raise BadRecord(
            f"{where} has unexpected or missing fields "
            f"({', '.join(sorted(set(doc) ^ expected))[:120]})"
        )
    fields = _fields(doc["fields"], kind, where)
    if kind == "run":
        return _run(doc["layer"], fields, signer, where)
    if kind in ("export", "diff"):
        ref = _ref(_dict(doc[kind], {"object"}, where)["object"], where)
        return Record(kind, fields, ref=ref, signer=signer, objects=(ref,))
    if kind == "assemble":
        image = _dict(doc["image"], {"object", "size", "blake3"}, where)
        ref = _ref(image["object"], where)
        return Record(
            kind,
            fields,
            ref=ref,
            image_size=_size(image["size"], where),
            image_blake3=_hex(image["blake3"], where),
            signer=signer,
            objects=(ref,),
        )
    return Record(kind, fields, signer=signer)


def _label(claimed: dict[str, Any]) -> str:
    step, key = claimed.get("step"), claimed.get("key")
    text = f"{step if isinstance(step, str) else '?'}"
    if isinstance(key, str):
        text += f" {key[:12]}…"
    return text[:60]


def _dict(value: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise BadRecord(f"{where} is malformed (expected the fields {', '.join(sorted(keys))})")
    return value


def _size(value: Any, where: str) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (0 <= value <= MAX_OBJECT_BYTES)
    ):
        raise BadRecord(f"{where} is malformed (a size is not a byte count)")
    return value


def _time(value: Any, where: str) -> float:
    """A time in seconds since the epoch (a finite, non-negative number)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not (0 <= value < 1e11):
        raise BadRecord(f"{where} is malformed (a time is not a number of seconds)")
    return float(value)


def _hex(value: Any, where: str) -> str:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise BadRecord(f"{where} is malformed (a hash is not 64 hex digits)")
    return value


def _bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRecord(f"{where} is malformed (expected base64)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRecord(f"{where} is malformed (bad base64)") from exc


def _ref(value: Any, where: str) -> ObjectRef:
    try:
        return ObjectRef.from_json(value)
    except BadObject as exc:
        raise BadRecord(f"{where}: {exc.message}") from exc


# When a record's result, and each command result it was made from, were made (rfs.graph.planner
# `staleness`): optional, so records of writers that do not send them still decode.
_TIMES = {"created", "made_at"}


def _fields(value: Any, kind: str, where: str) -> dict[str, Any]:
    times = {k: value.pop(k) for k in _TIMES & set(value)} if isinstance(value, dict) else {}
    fields = dict(_dict(value, _FIELDS[kind], where))
    if "created" in times:
        fields["created"] = _time(times["created"], where)
    if "made_at" in times:
        made_at = times["made_at"]
        if not isinstance(made_at, dict) or len(made_at) > 10_000:
            raise BadRecord(f"{where} is malformed (made_at is not a table of times)")
        fields["made_at"] = {_hex(k, where): _time(v, where) for k, v in made_at.items()}
    if "etc_written" in fields:
        etc = fields["etc_written"]
        if not isinstance(etc, dict) or not set(etc) <= set(MANAGED):
            raise BadRecord(f"{where} is malformed (etc_written names a file rfs does not manage)")
        fields["etc_written"] = {path: _bytes(text, where) for path, text in etc.items()}
    if kind in ("export", "diff"):
        fields["blob_size"] = _size(fields["blob_size"], where)
        fields["blob_digest"] = _hex(fields["blob_digest"], where)
    if kind == "diff":
        fields["anchor"] = _flag(fields["anchor"], where)
        fields["chain"] = _chain(fields["chain"], where)
    if kind == "run":
        fields["new_layer"] = _flag(fields["new_layer"], where)
    if kind == "overlays":
        fields["overlays"] = _size(fields["overlays"], where)
    if kind == "run" and not (
        isinstance(fields["image_id"], str) and _IMAGE_ID.fullmatch(fields["image_id"])
    ):
        raise BadRecord(f"{where} is malformed (image_id)")
    return fields


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadRecord(f"{where} is malformed (a flag is not true or false)")
    return value


_MAX_CHAIN = 10_000  # diffs since an anchor: far more commands than a build script holds


def _chain(value: Any, where: str) -> dict[str, Any]:
    """A DIFF step's chain (rfs.run.layerchain): its keys choose cache entries, so each must
    be a key, and its counts counts."""
    chain = _dict(value, {"anchor", "diffs", "data", "entries"}, where)
    anchor = chain["anchor"]
    diffs = chain["diffs"]
    if not isinstance(diffs, list) or len(diffs) > _MAX_CHAIN:
        raise BadRecord(f"{where} is malformed (the chain's diffs are not a list of keys)")
    return {
        "anchor": anchor if anchor == "base" else _hex(anchor, where),
        "diffs": [_hex(d, where) for d in diffs],
        "data": _size(chain["data"], where),
        "entries": _size(chain["entries"], where),
    }


def _run(value: Any, fields: dict[str, Any], signer: str | None, where: str) -> Record:
    layer = _dict(value, {"config", "layers"}, where)
    config = _bytes(layer["config"], where)
    # The image ID is the digest of the config, and the config lists every layer's digest:
    # checking both here ties the whole image to the record.
    if "sha256:" + hashlib.sha256(config).hexdigest() != fields["image_id"]:
        raise BadRecord(f"{where}: its image config does not match its image ID")
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        raise BadRecord(f"{where}: its image config has no layer list") from exc
    items = layer["layers"]
    if (
        not isinstance(diff_ids, list)
        or not isinstance(items, list)
        or len(diff_ids) != len(items)
        or not items
    ):
        raise BadRecord(f"{where}: its layers do not match its image config")
    parts: list[LayerPart] = []
    objects: list[ObjectRef] = []
    for diff_id, item in zip(diff_ids, items, strict=True):
        if not isinstance(diff_id, str) or not _IMAGE_ID.fullmatch(diff_id):
            raise BadRecord(f"{where}: its image config has a malformed layer digest")
        if not isinstance(item, dict):
            raise BadRecord(f"{where} is malformed (a layer)")
        size = _size(item.get("size"), where)
        if "data" in item:
            data = _bytes(_dict(item, {"size", "data"}, where)["data"], where)
            # Inline layers are checked against the record's own hashes here, before use.
            if len(data) != size or hashlib.sha256(data).hexdigest() != diff_id[7:]:
                raise BadRecord(f"{where}: an inline layer does not match its digest")
            parts.append(LayerPart(diff_id[7:], size, data=data))
        else:
            ref = _ref(_dict(item, {"size", "object"}, where)["object"], where)
            parts.append(LayerPart(diff_id[7:], size, ref=ref))
            objects.append(ref)
    return Record(
        "run", fields, config=config, layers=tuple(parts), signer=signer, objects=tuple(objects)
    )
