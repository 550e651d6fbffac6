"""Signed remote records, the way Nix binary caches sign theirs: ed25519, keys named.

    secret key file   rfs-secret-key-1:NAME:BASE64   (32-byte ed25519 seed; mode 0600)
    public key        rfs-key-1:NAME:BASE64          (32-byte ed25519 public key; one line)
    signature line    sig NAME:BASE64                (64-byte signature, in a record's header)

A signature covers the record's name, scope, step key and whole body (`signed_message`), so a
record moved to another name, scope or key no longer verifies. The reader rebuilds the message
from what it asked for, never from what the record claims.

The cryptography is `cryptography`'s (pyca): rfs only encodes keys and picks the message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rfs.errors import EnvironmentProblem, UsageError

PUBLIC_PREFIX = "rfs-key-1"
SECRET_PREFIX = "rfs-secret-key-1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Key text is read from flags, the environment and files: bounded, so a wrong file named by
# mistake (an image, say) is refused without being read whole.
_MAX_KEY_FILE = 4096
SIG_LINE = re.compile(rb"sig ([A-Za-z0-9][A-Za-z0-9._-]{0,63}):([A-Za-z0-9+/]{86}==)")


@dataclass(frozen=True)
class PublicKey:
    """A key whose signatures a reader trusts."""

    name: str
    raw: bytes  # 32 bytes

    def text(self) -> str:
        """The one-line form users copy into --cache-trust."""
        return f"{PUBLIC_PREFIX}:{self.name}:{base64.b64encode(self.raw).decode()}"

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's signature of `message`."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    """A writer's signing key."""

    name: str
    seed: bytes  # 32 bytes

    def public(self) -> PublicKey:
        """The matching public key."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = Ed25519PrivateKey.from_private_bytes(self.seed)
        return PublicKey(self.name, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign_line(self, message: bytes) -> bytes:
        """The record header line carrying this key's signature of `message`."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)
        return b"sig " + self.name.encode() + b":" + base64.b64encode(signature)


def signed_message(name: str, scope: str, key: str, body: bytes) -> bytes:
    """What a record's signature covers: its name, scope (empty: the default scope), step key
    and whole body, each field separated by NUL (none of the first three can hold one)."""
    return b"\0".join([b"rfs-record-sig-1", name.encode(), scope.encode(), key.encode(), body])


def _decode(text: str, prefix: str, what: str) -> tuple[str, bytes]:
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0] != prefix:
        raise UsageError(f"{what}: expected {prefix}:NAME:BASE64, got {_shorten(text)!r}")
    name, data = parts[1], parts[2]
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"{what}: the key name {name!r} is not letters, digits and . _ - (at most 64)"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"{what}: {_shorten(text)!r} does not hold a 32-byte ed25519 key")
    return name, raw


def _shorten(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def parse_public_key(text: str, where: str = "trusted key") -> PublicKey:
    """A public key from its one-line text; UsageError (exit 2) if malformed."""
    if text.strip().startswith(SECRET_PREFIX + ":"):
        raise UsageError(
            f"{where}: this is a secret key; trust its public key instead (the "
            "line `rfs cache keygen` printed), and keep the secret one secret"
        )
    name, raw = _decode(text, PUBLIC_PREFIX, where)
    key = PublicKey(name, raw)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:  # not every 32 bytes are a point on the curve
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise UsageError(f"{where}: {_shorten(text)!r} is not an ed25519 public key") from exc
    return key


def parse_public_keys(items: Iterable[str], where: str) -> tuple[PublicKey, ...]:
    """Several public keys (flags, a list in the config file, a split variable)."""
    keys: list[PublicKey] = []
    for item in items:
        if item.strip():
            key = parse_public_key(item, where)
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def split_keys(text: str) -> list[str]:
    """The keys of RFS_CACHE_TRUST: separated by spaces, commas or newlines."""
    return [k for k in re.split(r"[\s,]+", text) if k]


def load_secret_key(path: Path, where: str = "--cache-sign-key") -> SecretKey:
    """The signing key in the file `path`; UsageError (exit 2) if unreadable or malformed."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(
            f"{where}: cannot read the key file {path}: {exc.strerror or exc}"
        ) from exc
    if len(data) > _MAX_KEY_FILE:
        raise UsageError(f"{where}: {path} is not an rfs secret key file (too large)")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{where}: {path} is not an rfs secret key file") from None
    if text.startswith(PUBLIC_PREFIX + ":"):
        raise UsageError(
            f"{where}: {path} holds a public key; signing needs the secret key "
            "file `rfs cache keygen` wrote"
        )
    name, seed = _decode(text, SECRET_PREFIX, f"{where} {path}")
    return SecretKey(name, seed)


def generate(path: Path, name: str) -> PublicKey:
    """Write a new secret key to `path` (mode 0600, never over an existing file); return its
    public key."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"key name {name!r}: use letters, digits and . _ - (at most 64)")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    seed = Ed25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    secret = SecretKey(name, seed)
    text = f"{SECRET_PREFIX}:{name}:{base64.b64encode(seed).decode()}\n".encode()
    try:
        # O_EXCL: never replace a key (the old one may still sign records readers trust);
        # 0600 from the start, so the secret is never readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{path} exists: rfs does not overwrite a key; remove it first or choose another file"
        ) from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise EnvironmentProblem(f"cannot write {path}: {exc.strerror or exc}") from exc
    return secret.public()


def check_signatures(
    lines: Sequence[tuple[str, bytes]], trusted: Sequence[PublicKey], message: bytes
) -> tuple[str | None, str]:
    """(name of the trusted key whose signature of `message` is among the (name, signature)
    pairs, "") or (None, why there is none, in a few words)."""
    if not lines:
        return None, "not signed"
    for name, signature in lines:
        for key in trusted:
            if key.name == name and key.verifies(message, signature):
                return name, ""
    names = sorted({name for name, _ in lines})
    if any(key.name in names for key in trusted):
        return None, f"the signature by {', '.join(names)} does not verify (altered or moved)"
    return None, f"signed by {', '.join(names)}, not a trusted key"
