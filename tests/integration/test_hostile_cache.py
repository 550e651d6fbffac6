"""A hostile cache server can cost a miss, never a wrong image (issue 13).

Runner A builds a package (and a variant of it) from an empty cache, signing what it uploads;
that image is the clean build. A server then answers runner B like an attacker: a real HTTP
server on 127.0.0.1 (tests/hostileserver.py) for the HTTP backend, the real registry
(tests/cacheservers.py) for OCI. For every attack B's build must succeed with the clean image,
write nothing outside its cache directory (and its output), move no tag in the engine, and say
what happened in exactly one warning line naming the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.cachefiles import remove_layers
from tests.cacheservers import ServerMissing, start_registry
from tests.conftest import require_or_skip
from tests.constants import BUSYBOX
from tests.hostileserver import (
    FakeCache,
    Handler,
    endless,
    join_record,
    object_refs,
    split_record,
    trickled,
    truncated,
    unsigned,
)
from tests.packages import write_package
from tests.rfsrun import Rfs, Run

if TYPE_CHECKING:
    from rfs.remote.base import Backend

pytestmark = pytest.mark.integration

CANARY = "rfs-test-hostile/canary:1"  # a tag the retagging records ask for
WATCHED = ("rfs-test/busybox", "rfs-test-hostile/canary")  # repos whose tags must not move
ESCAPE = "pwned-by-the-cache-server"

BUILD_TOML = """
[filesystem]
size_mib = 32

[container]
image = { name = "rfs-test/busybox", tag = "1" }

[[commands]]
script_inline = '''
#!/bin/sh
mkdir -p /srv/data
echo MARKER > /srv/data/marker
'''

[[commands]]
command = "touch /srv/data/two"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"
"""


def rfs(*args: str | Path, cache: Path, cwd: Path, config: str = "") -> Run:
    """Run `rfs` with its own cache directory and config file, from `cwd`."""
    conf = cwd / f"config-{uuid.uuid4().hex[:8]}.toml"
    conf.write_text(config)
    try:
        return Rfs(cache, env={"RFS_CONFIG": str(conf)}, cwd=cwd)(*args)
    finally:
        conf.unlink()


def watched_tags(client: Any) -> dict[str, str]:
    """Tag -> image ID for the repos no remote record may touch (one listing: other tests
    remove their images meanwhile, which per-image look-ups would trip over)."""
    return {
        tag: str(image["Id"])
        for image in client.api.images()
        for tag in image.get("RepoTags") or ()
        if tag.rsplit(":", 1)[0] in WATCHED
    }


def keygen(path: Path) -> str:
    made = Rfs(path.parent / "keygen-cache")("cache", "keygen", path)
    assert made.code == 0, made.err
    return made.out.strip()


@dataclass
class Warm:
    """What runner A left: the clean image and a cache of signed records."""

    root: Path
    pkg: Path
    clean: bytes
    records: dict[str, bytes]  # by name, as uploaded (signed by ci)
    objects: dict[str, bytes]
    names: dict[str, str]  # step id -> record name, for the package
    variant: dict[str, str]  # step id -> record name of the variant, where it differs
    ci_key: Path
    ci_pub: str
    other_pub: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> body


def _bodies(records: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: split_record(data)[1] for name, data in records.items()}


def make_package(root: Path, marker: str, last: str) -> Path:
    return write_package(
        root / f"pkg-{last.split('/')[-1]}",
        BUILD_TOML.replace("MARKER", marker).replace("touch /srv/data/two", last),
        {"files/motd": "hello from the cache\n"},
    )


@pytest.fixture(scope="module")
def warm(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:
    root = tmp_path_factory.mktemp("hostile")
    ci_pub, other_pub = keygen(root / "ci.key"), keygen(root / "other.key")
    marker = uuid.uuid4().hex
    pkg = make_package(root, marker, "touch /srv/data/two")
    variant = make_package(root, marker, "touch /srv/data/TWO")
    fake = FakeCache()
    cache_a = root / "cache-a"
    try:
        a = rfs(
            "build",
            pkg,
            "-o",
            root / "a.ext4",
            "--cache-to",
            fake.url,
            "--cache-sign-key",
            root / "ci.key",
            cache=cache_a,
            cwd=root,
        )
        assert a.code == 0, a.err
        first = dict(fake.records)
        v = rfs(
            "build",
            variant,
            "-o",
            root / "v.ext4",
            "--cache-to",
            fake.url,
            "--cache-sign-key",
            root / "ci.key",
            cache=cache_a,
            cwd=root,
        )
        assert v.code == 0, v.err
    finally:
        fake.stop()
        remove_layers(docker_client, cache_a)
    bodies = _bodies(fake.records)
    names = {bodies[n]["step"]: n for n in first}
    changed = {bodies[n]["step"]: n for n in set(fake.records) - set(first)}
    assert set(changed) == {"run[1]", "diff[1]", "assemble"}, changed
    yield Warm(
        root,
        pkg,
        (root / "a.ext4").read_bytes(),
        dict(fake.records),
        dict(fake.objects),
        names,
        changed,
        root / "ci.key",
        ci_pub,
        other_pub,
        bodies,
    )


def files_outside(case: Path) -> set[Path]:
    """Every path under `case` but the cache directory."""
    return {p for p in case.rglob("*") if "cache" not in p.relative_to(case).parts}


@dataclass
class Outcome:
    proc: Run
    warnings: list[str]


def build_b(client: Any, warm: Warm, url: str, *extra: str, config: str = "") -> Outcome:
    """Runner B: an empty cache directory, an engine without A's layers. Checks what every
    attack must leave true, and returns what B said."""
    case = warm.root / f"b-{uuid.uuid4().hex[:8]}"
    (case / "out").mkdir(parents=True)
    cache = case / "cache"
    before_files, before_tags = files_outside(case), watched_tags(client)
    try:
        proc = rfs(
            "build",
            warm.pkg,
            "-o",
            case / "out" / "b.ext4",
            "--cache-from",
            url,
            *extra,
            cache=cache,
            cwd=case,
            config=config,
        )
        assert proc.code == 0, proc.err
        assert "Traceback" not in proc.err, proc.err
        assert (case / "out" / "b.ext4").read_bytes() == warm.clean  # the clean image
        assert files_outside(case) == before_files | {case / "out" / "b.ext4"}
        assert not list(warm.root.glob(f"{ESCAPE}*")) and not list(case.glob(f"{ESCAPE}*"))
        assert watched_tags(client) == before_tags  # the base image's tag did not move
        assert CANARY not in before_tags
    finally:
        remove_layers(client, cache)
    warnings = [ln for ln in proc.err.splitlines() if "warning:" in ln]
    naming = [ln for ln in warnings if url.rstrip("/") in ln]
    assert len(warnings) == len(naming) == 1, proc.err
    return Outcome(proc, warnings)


def fetched(outcome: Outcome) -> list[str]:
    return [
        ln.split()[1] for ln in outcome.proc.err.splitlines() if ln.strip().startswith("fetched ")
    ]


# -- the attacks on the HTTP backend ----------------------------------------------------------

Attack = Callable[[FakeCache, Warm], None]


def _rewrite(fake: FakeCache, warm: Warm, edit: Callable[[dict[str, Any]], None]) -> None:
    fake.objects = dict(warm.objects)
    for name, data in warm.records.items():
        header, body = split_record(data)
        edit(body)
        fake.records[name] = join_record(header, body)


def escaping_names(fake: FakeCache, warm: Warm) -> None:
    """Every object a record names climbs out of the cache directory (64 characters long)."""

    def edit(body: dict[str, Any]) -> None:
        for ref in object_refs(body):
            ref["sha256"] = ("../../../" + ESCAPE).ljust(64, "x")

    _rewrite(fake, warm, edit)
    fake.any_object = b"the server's bytes\n"


def damaged_objects(fake: FakeCache, warm: Warm) -> None:
    """Every object has one bit flipped (same size)."""
    fake.records = dict(warm.records)
    for name, data in warm.objects.items():
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x10
        fake.objects[name] = bytes(flipped)


def lying_objects(fake: FakeCache, warm: Warm) -> None:
    """Objects that match the hashes their records give, but are not what they claim: an image
    that is not zstd, an export that decompresses far beyond its size, layers whose content
    is not their diff_id."""
    import zstandard

    def put(ref: dict[str, Any], data: bytes) -> None:
        import blake3

        ref.update(
            sha256=hashlib.sha256(data).hexdigest(),
            blake3=blake3.blake3(data).hexdigest(),
            size=len(data),
        )
        fake.objects[ref["sha256"]] = data

    fake.objects = dict(warm.objects)
    for name, data in warm.records.items():
        header, body = split_record(data)
        if "image" in body:
            put(body["image"]["object"], zlib.compress(b"not zstd at all" * 1000))
        elif "export" in body or "diff" in body:
            bomb = zstandard.ZstdCompressor().compress(
                b"\0" * (body["fields"]["blob_size"] + (8 << 20))
            )
            put(body["export" if "export" in body else "diff"]["object"], bomb)
        elif "layer" in body:
            for layer in body["layer"]["layers"]:
                if "object" in layer:
                    put(layer["object"], zstandard.ZstdCompressor().compress(b"\1" * layer["size"]))
        fake.records[name] = join_record(header, body)


def oversized(fake: FakeCache, warm: Warm) -> None:
    """Records of 24 MiB (declared, or chunked without a length); the image object longer
    than its record says."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)
    image = warm.steps[warm.names["assemble"]]["image"]["object"]["sha256"]
    fake.objects[image] = warm.objects[image] + b"\0" * 4096

    def hook(handler: Handler, kind: str, name: str) -> bool:
        if kind == "ac" and name != warm.names["assemble"]:
            endless(handler, declare=int(name[0], 16) % 2 == 0)
            return True
        return False

    fake.hook = hook


def truncated_objects(fake: FakeCache, warm: Warm) -> None:
    """Every object answer promises its full length, sends half and hangs up."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)

    def hook(handler: Handler, kind: str, name: str) -> bool:
        if kind == "cas" and name in fake.objects:
            truncated(handler, fake.objects[name])
            return True
        return False

    fake.hook = hook


def slow_records(fake: FakeCache, warm: Warm) -> None:
    """Records trickle in a byte at a time, each inside the read time-out: forever, nearly."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)

    def hook(handler: Handler, kind: str, name: str) -> bool:
        if kind == "ac" and name in fake.records:
            trickled(handler, fake.records[name])
            return True
        return False

    fake.hook = hook


def relabelled(fake: FakeCache, warm: Warm) -> None:
    """The variant's records stored under the package's names."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)
    for step, name in warm.variant.items():
        fake.records[warm.names[step]] = warm.records[name]


def relabelled_rewritten(fake: FakeCache, warm: Warm) -> None:
    """... with name, key and step rewritten to match: only a signature can tell."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)
    for step, name in warm.variant.items():
        header, body = split_record(warm.records[name])
        real = warm.steps[warm.names[step]]
        body.update(name=real["name"], key=real["key"], step=real["step"])
        fake.records[warm.names[step]] = join_record(header, body)


def retagging(fake: FakeCache, warm: Warm) -> None:
    """Layer records whose inline manifest.json tags the base image (the format of rfs 0.1, which
    `docker load` obeyed), or that carry such a manifest beside the layers. No image and
    no export record, so the planner asks for the layers."""
    fake.objects = dict(warm.objects)
    for step, name in warm.names.items():
        header, body = split_record(warm.records[name])
        if step in ("assemble", "export") or step.startswith("diff["):
            continue
        if step == "overlays":
            fake.records[name] = warm.records[name]
            continue
        config = base64.b64decode(body["layer"]["config"])
        image_hex = hashlib.sha256(config).hexdigest()
        manifest = [
            {
                "Config": f"{image_hex}.json",
                "RepoTags": [BUSYBOX, CANARY],
                "Layers": [f"l{i}/layer.tar" for i in range(len(body["layer"]["layers"]))],
            }
        ]
        if step == "run[1]":  # the new format, with a manifest added
            body["layer"]["manifest"] = manifest
            fake.records[name] = join_record(header, body)
            continue
        members = [
            {
                "name": "manifest.json",
                "type": "file",
                "mode": 0o644,
                "mtime": 0,
                "data": base64.b64encode(json.dumps(manifest).encode()).decode(),
            },
            {
                "name": f"{image_hex}.json",
                "type": "file",
                "mode": 0o644,
                "mtime": 0,
                "data": body["layer"]["config"],
            },
        ]
        for i, layer in enumerate(body["layer"]["layers"]):
            member = {"name": f"l{i}/layer.tar", "type": "file", "mode": 0o644, "mtime": 0}
            members.append(
                {
                    **member,
                    **(
                        {"data": layer["data"]}
                        if "data" in layer
                        else {"object": layer["object"], "size": layer["size"]}
                    ),
                }
            )
        old = {
            "format": "rfs-remote-1",
            "key": body["key"],
            "kind": "run",
            "step": step,
            "layer": {"members": members},
            "record": {"image_id": body["fields"]["image_id"], "etc_written": {}},
        }
        fake.records[name] = json.dumps(old).encode()


def unsigned_records(fake: FakeCache, warm: Warm) -> None:
    """Good records, their signatures removed."""
    fake.objects = dict(warm.objects)
    fake.records = {name: unsigned(data) for name, data in warm.records.items()}


def as_uploaded(fake: FakeCache, warm: Warm) -> None:
    """Good records signed by a key the reader does not trust."""
    fake.records, fake.objects = dict(warm.records), dict(warm.objects)


TRUST_CI, TRUST_OTHER = "ci", "other"

CASES: list[tuple[Attack, str | None, str, list[str]]] = [
    # attack, key trusted, what the warning says, steps still fetched (good copies)
    (escaping_names, None, "malformed object reference", ["overlays"]),
    (damaged_objects, None, "does not match its blake3 hash", ["overlays"]),
    (lying_objects, None, "does not decompress", ["overlays"]),
    (oversized, None, "too large", []),
    # A connection cut short is a server fault: the server is not asked again in this build.
    (truncated_objects, None, "ended early", []),
    (slow_records, None, "took more than", []),
    (relabelled, None, "is for another step", ["run[0]", "diff[0]", "overlays"]),
    (relabelled_rewritten, TRUST_CI, "does not verify", ["run[0]", "diff[0]", "overlays"]),
    (retagging, None, "unknown format", ["overlays"]),
    (unsigned_records, TRUST_CI, "not signed", []),
    (as_uploaded, TRUST_OTHER, "signed by ci, not a trusted key", []),
]


@pytest.mark.parametrize(
    ("attack", "trust", "says", "still_fetched"), CASES, ids=[case[0].__name__ for case in CASES]
)
def test_http_attack_costs_a_miss(
    docker_client: Any,
    warm: Warm,
    attack: Attack,
    trust: str | None,
    says: str,
    still_fetched: list[str],
) -> None:
    fake = FakeCache()
    try:
        attack(fake, warm)
        extra = (
            []
            if trust is None
            else ["--cache-trust", warm.ci_pub if trust == TRUST_CI else warm.other_pub]
        )
        outcome = build_b(
            docker_client, warm, fake.url, *extra, config="[cache]\ntimeout = 1\nretries = 0\n"
        )
    finally:
        fake.stop()
    assert says in outcome.warnings[0], outcome.warnings
    assert sorted(fetched(outcome)) == sorted(still_fetched), outcome.proc.err
    if trust is not None:
        assert "not signed by a trusted key" in outcome.warnings[0]


def test_signed_records_are_used_by_a_trusting_reader(docker_client: Any, warm: Warm) -> None:
    """The control: the same server, honest, and a reader trusting the CI key fetches the
    image without a warning."""
    fake = FakeCache()
    case = warm.root / "trusting"
    case.mkdir()
    try:
        fake.records, fake.objects = dict(warm.records), dict(warm.objects)
        proc = rfs(
            "build",
            warm.pkg,
            "-o",
            case / "b.ext4",
            "--cache-from",
            fake.url,
            "--cache-trust",
            warm.ci_pub,
            cache=case / "cache",
            cwd=case,
        )
    finally:
        fake.stop()
        remove_layers(docker_client, case / "cache")
    assert proc.code == 0, proc.err
    assert "warning" not in proc.err and "signed by ci" in proc.err, proc.err
    assert (case / "b.ext4").read_bytes() == warm.clean


# -- the OCI backend, on the real registry ----------------------------------------------------


@dataclass
class Registry:
    url: str
    backend: Backend
    good: dict[str, bytes]  # name -> record, as uploaded


@pytest.fixture(scope="module")
def registry(docker_client: Any, warm: Warm) -> Iterator[Registry]:
    import requests

    from rfs.remote import open_backend
    from rfs.remote.config import RemoteSettings

    try:
        server = start_registry()
    except ServerMissing as exc:
        require_or_skip(str(exc))
    cache = warm.root / "cache-oci-a"
    try:
        a = rfs(
            "build",
            warm.pkg,
            "-o",
            warm.root / "oci-a.ext4",
            "--cache-to",
            server.url,
            "--cache-sign-key",
            warm.ci_key,
            cache=cache,
            cwd=warm.root,
        )
        remove_layers(docker_client, cache)
        assert a.code == 0, a.err
        tags = requests.get(
            f"http://127.0.0.1:{server.port}/v2/rfs/cache/tags/list", timeout=10
        ).json()["tags"]
        backend = open_backend(server.url, RemoteSettings())
        good: dict[str, bytes] = {}
        for name in tags:
            record = backend.get_record(name)
            assert record is not None, f"{name} is listed but not served"
            good[name] = record
        yield Registry(server.url, backend, good)
        backend.close()
    finally:
        server.stop()


def _oci_put(reg: Registry, name: str, data: bytes) -> None:
    from rfs.remote.codec import ObjectRef

    refs = [ObjectRef.from_json(r) for r in object_refs(split_record(data)[1])]
    reg.backend.put_record(name, data, refs)


def _altered(data: bytes) -> bytes:
    """A signed record changed after signing: /etc/hostname of the image rewritten where the
    record carries it, else the same body re-serialised with spaces (the same JSON)."""
    header, body = split_record(data)
    if "etc_written" in body["fields"]:
        body["fields"]["etc_written"]["/etc/hostname"] = base64.b64encode(b"pwned\n").decode()
        return join_record(header, body)
    return b"\n".join(header) + b"\n\n" + json.dumps(body, sort_keys=True, indent=1).encode()


OCI_CASES = [
    ("unsigned", TRUST_CI, "not signed"),
    ("wrong-key", TRUST_OTHER, "not a trusted key"),
    ("altered", TRUST_CI, "does not verify"),
]


@pytest.mark.parametrize(("attack", "trust", "says"), OCI_CASES, ids=[c[0] for c in OCI_CASES])
def test_oci_attack_costs_a_miss(
    docker_client: Any, warm: Warm, registry: Registry, attack: str, trust: str, says: str
) -> None:
    try:
        for name, data in registry.good.items():
            if attack == "unsigned":
                _oci_put(registry, name, unsigned(data))
            elif attack == "altered":
                _oci_put(registry, name, _altered(data))
        outcome = build_b(
            docker_client,
            warm,
            registry.url,
            "--cache-trust",
            warm.ci_pub if trust == TRUST_CI else warm.other_pub,
        )
    finally:
        for name, data in registry.good.items():
            _oci_put(registry, name, data)
    assert says in outcome.warnings[0], outcome.warnings
    assert "not signed by a trusted key" in outcome.warnings[0]
    assert fetched(outcome) == []
