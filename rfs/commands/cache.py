"""`rfs cache info|verify|prune|clear|keygen`: inspect the local cache and keep it within bounds;
make a key to sign remote cache records with.

Entries a running build uses are never dropped (see rfs.host.locks); dropping a layer entry also
removes its `rfs/layer/<cache name>:<key>` tag from the engine that made it (the default socket
of Docker or Podman), and an entry whose engine cannot be reached is kept rather than orphaned.
Each cache directory tags only its own layers, so clearing one leaves the others' alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rfs.commands import add_cache_options, cache_dir, cache_size
from rfs.errors import EXIT_OK

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Parse "7d", "12h", "30m", "90s", "2w" (or plain seconds) into seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (try 7d, 12h or 30m)")
    return float(m.group(1)) * _AGE_UNITS[m.group(2) or "s"]


def register(sub: Any) -> None:
    """Add the `cache` parser and its sub-verbs."""
    from rfs.commands import parse_size

    p = sub.add_parser(
        "cache",
        help="inspect, prune or clear the local cache; make a signing key for a shared cache",
    )
    verbs = p.add_subparsers(
        dest="cache_verb", metavar="info|verify|prune|clear|keygen", required=True
    )
    info = verbs.add_parser("info", help="entries, bytes and hits by kind")
    add_cache_options(info)
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.set_defaults(func=run_info)
    verify = verbs.add_parser(
        "verify",
        help="rehash every cached file and drop the entries whose content changed",
    )
    add_cache_options(verify)
    verify.set_defaults(func=run_verify)
    prune = verbs.add_parser("prune", help="drop least recently used entries")
    add_cache_options(prune)
    prune.add_argument(
        "--max-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="drop least recently used entries until the cache's files fit in SIZE (e.g. 10G)",
    )
    prune.add_argument(
        "--older-than",
        type=parse_age,
        default=None,
        metavar="AGE",
        help="drop entries not used for AGE (e.g. 7d, 12h)",
    )
    prune.set_defaults(func=run_prune)
    clear = verbs.add_parser("clear", help="drop every entry no running build uses")
    add_cache_options(clear)
    clear.set_defaults(func=run_clear)
    keygen = verbs.add_parser(
        "keygen",
        help="write a new secret key for signing remote cache records (mode 0600) "
        "and print its public key",
    )
    keygen.add_argument(
        "keyfile",
        type=Path,
        metavar="KEYFILE",
        help="where to write the secret key (never over an existing file)",
    )
    keygen.add_argument(
        "--name",
        default=None,
        help="the key's name, shown in signatures and warnings (default: "
        "KEYFILE's name without its extension, e.g. ci-2025)",
    )
    keygen.set_defaults(func=run_keygen)


def _open(args: argparse.Namespace) -> Any:
    from rfs.run.store import Store

    return Store(cache_dir(args), cache_size(args))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def run_info(args: argparse.Namespace) -> int:
    """Print entries, bytes and hits by kind."""
    store = _open(args)
    try:
        stats = store.stats()
    finally:
        store.close()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"cache directory: {stats['directory']}")
    print(
        f"entries: {stats['entries']}, files: {_size(stats['blob_bytes'])} "
        f"(limit {_size(stats['size_limit'])}), hits: {stats['hits']}"
    )
    print(f"  {'kind':<10} {'entries':>7} {'bytes':>10} {'hits':>6} {'fetched':>8}")
    for kind in ("run", "export", "diff", "base-export", "overlays", "assemble", "ext4-base"):
        row = stats["kinds"].get(kind)
        if row is None:
            continue
        print(
            f"  {kind:<10} {row['entries']:>7} {_size(row['bytes']):>10} {row['hits']:>6} "
            f"{row['remote_hits']:>8}"
        )
    print(
        "  (run: layer images live in the engine, tagged rfs/layer/<cache name>:<key>; "
        "ext4-base: images without overlays, patched on an overlay edit; fetched: downloaded "
        "from a remote cache)"
    )
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    """Rehash every blob, ignoring what the store remembers of earlier checks, and drop the
    entries whose file no longer has its recorded digest (the next build makes them again)."""
    store = _open(args)
    checked = damaged = 0
    try:
        for key, _record in list(store.records()):
            blob = store.blob(key)
            if blob is None:
                continue
            checked += 1
            if not store.verify_blob(blob):  # without the key: always read
                damaged += 1
                print(f"damaged: {key} ({_size(blob.size)}): dropped")
                store.drop(key)
    finally:
        store.close()
    print(f"checked {checked} files, dropped {damaged} damaged")
    return EXIT_OK


class _LayerRemover:
    """Removes the engine tags of dropped layer entries, one connection per engine."""

    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}
        self.failed: set[str] = set()
        self.removed = 0

    def __call__(self, key: str, record: dict[str, Any]) -> bool:
        # Layers, and the images `container.dockerfile` bases built.
        if record.get("kind") not in ("run", "dockerfile") or not record.get("tag"):
            return True
        from rfs.engine import connect
        from rfs.errors import EngineError

        name = str(record.get("inputs", {}).get("engine", "docker"))
        if name in self.failed:
            return False
        try:
            engine = self.engines.get(name)
            if engine is None:
                engine = self.engines[name] = connect(name)
                engine.ping()
            engine.remove_image(str(record["tag"]))
        except EngineError as exc:
            self.failed.add(name)
            print(f"rfs: warning: keeping layer entries of {name}: {exc.message}", file=sys.stderr)
            return False
        self.removed += 1
        return True


def _prune(args: argparse.Namespace, **limits: Any) -> int:
    store = _open(args)
    remover = _LayerRemover()
    try:
        before = store.blob_bytes()
        dropped = store.prune(on_drop=remover, **limits)
        after = store.blob_bytes()
    finally:
        store.close()
    print(
        f"dropped {len(dropped)} entries ({remover.removed} layer images), "
        f"freed {_size(max(before - after, 0))} of files"
    )
    return EXIT_OK


def run_prune(args: argparse.Namespace) -> int:
    """Drop entries by age and least recently used order."""
    from rfs.errors import UsageError

    if args.max_size is None and args.older_than is None:
        raise UsageError(
            "rfs cache prune needs --max-size and/or --older-than "
            "(rfs cache clear drops everything)"
        )
    return _prune(args, max_size=args.max_size, older_than=args.older_than)


def run_clear(args: argparse.Namespace) -> int:
    """Drop every entry that no running build uses."""
    return _prune(args)


def run_keygen(args: argparse.Namespace) -> int:
    """Write a secret signing key and print its public key, on one line, on stdout."""
    from rfs.remote.signing import generate

    name = args.name or args.keyfile.name.split(".")[0]
    public = generate(args.keyfile, name)
    print(public.text())
    print(
        f"rfs: wrote the secret key {args.keyfile} (mode 0600): keep it in the CI secret "
        "store, sign with --cache-sign-key; readers trust the line above with "
        "--cache-trust",
        file=sys.stderr,
    )
    return EXIT_OK
