"""Where a build's remote cache settings come from: flags, then environment, then config file.

    --cache-from URL (repeatable)  RFS_CACHE_FROM="URL URL"   [cache] from = ["URL", …]
    --cache-to URL                 RFS_CACHE_TO=URL            [cache] to = "URL"
    --cache-scope NAME             RFS_CACHE_SCOPE=NAME        [cache] scope = "NAME"
    --cache-strict                 RFS_CACHE_STRICT=1          [cache] strict = true
    --cache-sign-key FILE          RFS_CACHE_SIGN_KEY=FILE
    --cache-trust KEY (repeatable) RFS_CACHE_TRUST="KEY KEY"   [cache] trusted_keys = ["KEY"]
                                   RFS_CACHE_INSECURE=1        [cache] insecure = true
                                                               [cache] timeout = 30, retries = 2

The config file is $RFS_CONFIG, else $XDG_CONFIG_HOME/rfs/config.toml, else
~/.config/rfs/config.toml; a flag beats the environment, which beats the file. A laptop that
only reads what CI wrote sets `from` and no `to`, and the CI key in `trusted_keys`.

Signing (rfs.remote.signing): a writer given a secret key signs every record it writes and
trusts that key's records; a reader given trusted keys uses only records one of them signed.
No secret key is read from the config file: it belongs in the CI secret store.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import UsageError

if TYPE_CHECKING:
    from rfs.remote.signing import PublicKey, SecretKey

SCHEMES = ("http://", "https://", "oci://")
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class RemoteSettings:
    """Which remote caches a build reads and writes, and how patiently."""

    sources: tuple[str, ...] = ()  # read, in order (the write target is read too)
    target: str | None = None  # write
    scope: str | None = None  # writes go here; reads try it, then the default scope
    strict: bool = False  # a remote failure fails the build (exit 3) instead of warning
    timeout_s: float = 30.0  # between bytes of a response
    connect_timeout_s: float = 3.0
    retries: int = 2  # per request, for connection failures and 5xx answers
    insecure: bool = False  # plain HTTP to registries off this machine too
    sign_key: SecretKey | None = None  # sign the records written
    trusted: tuple[PublicKey, ...] = ()  # if any: use only records one of these signed

    @property
    def record_deadline_s(self) -> float:
        """How long reading one record may take in all (the time-out is between bytes)."""
        return 4 * self.timeout_s

    @property
    def enabled(self) -> bool:
        """Whether any remote cache is configured."""
        return bool(self.sources or self.target)

    def read_urls(self) -> list[str]:
        """Every URL read, in order: the sources, then the write target."""
        urls = list(self.sources)
        if self.target and self.target not in urls:
            urls.append(self.target)
        return urls


def add_remote_options(p: argparse.ArgumentParser) -> None:
    """The remote cache flags of `rfs build` (and `rfs plan`)."""
    g = p.add_argument_group("remote cache")
    g.add_argument(
        "--cache-from",
        action="append",
        metavar="URL",
        default=None,
        help="read steps from this cache (http(s)://… or oci://host/repo); "
        "repeatable; default $RFS_CACHE_FROM or the config file",
    )
    g.add_argument(
        "--cache-to",
        metavar="URL",
        default=None,
        help="write the steps this build made to this cache (also read from)",
    )
    g.add_argument(
        "--cache-scope",
        metavar="NAME",
        default=None,
        help="write into this scope (e.g. the branch); reads try it, then the default scope",
    )
    g.add_argument(
        "--cache-strict",
        action="store_true",
        default=None,
        help="fail (exit 3) when a remote cache fails, instead of warning and building locally",
    )
    g.add_argument(
        "--cache-sign-key",
        metavar="FILE",
        default=None,
        help="sign the records written with this secret key (from `rfs cache "
        "keygen`); default $RFS_CACHE_SIGN_KEY",
    )
    g.add_argument(
        "--cache-trust",
        action="append",
        metavar="PUBKEY",
        default=None,
        help="use only remote records signed by this public key (rfs-key-1:NAME:"
        "BASE64); repeatable; default $RFS_CACHE_TRUST or trusted_keys in "
        "the config file",
    )


def config_path(environ: Mapping[str, str]) -> Path:
    """The config file rfs reads (it need not exist)."""
    if environ.get("RFS_CONFIG"):
        return Path(environ["RFS_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rfs" / "config.toml"


def _file_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    path = config_path(environ)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if environ.get("RFS_CONFIG"):
            raise UsageError(f"RFS_CONFIG names {path}, which does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the rfs config file {path}: {exc}") from exc
    cache = data.get("cache", {})
    if not isinstance(cache, dict):
        raise UsageError(f"{path}: [cache] must be a table")
    known = {"from", "to", "scope", "strict", "insecure", "timeout", "retries", "trusted_keys"}
    unknown = sorted(set(cache) - known)
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) in [cache]: {', '.join(unknown)}")
    return cache


def _urls(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    items = re.split(r"[\s,]+", value.strip()) if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(u, str) for u in items):
        raise UsageError(f"{where}: expected a URL or a list of URLs")
    return [check_url(u, where) for u in items if u]


def check_url(url: str, where: str = "cache URL") -> str:
    """`url` if it names a supported remote cache, else UsageError."""
    if not url.startswith(SCHEMES):
        raise UsageError(
            f"{where}: {url!r} is not a remote cache URL "
            "(use http://, https:// or oci://host/repository)"
        )
    return url


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE


def remote_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> RemoteSettings:
    """The settings the flags, environment and config file ask for."""
    env = os.environ if environ is None else environ
    conf = _file_settings(env)
    if getattr(args, "cache_from", None):
        sources = [check_url(u, "--cache-from") for u in args.cache_from]
    elif env.get("RFS_CACHE_FROM"):
        sources = _urls(env["RFS_CACHE_FROM"], "RFS_CACHE_FROM")
    else:
        sources = _urls(conf.get("from"), "config [cache] from")
    target = getattr(args, "cache_to", None) or env.get("RFS_CACHE_TO") or conf.get("to")
    if target is not None:
        target = check_url(str(target), "cache target")
    scope = getattr(args, "cache_scope", None) or env.get("RFS_CACHE_SCOPE") or conf.get("scope")
    if scope is not None and not _SCOPE.fullmatch(str(scope)):
        raise UsageError(f"cache scope {scope!r}: use letters, digits and . _ / - (at most 128)")
    strict = getattr(args, "cache_strict", None)
    if strict is None:
        strict = (
            _flag(env["RFS_CACHE_STRICT"])
            if "RFS_CACHE_STRICT" in env
            else _flag(conf.get("strict", False))
        )
    insecure = _flag(env.get("RFS_CACHE_INSECURE", conf.get("insecure", False)))
    try:
        timeout = float(conf.get("timeout", 30))
        retries = int(conf.get("retries", 2))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config [cache] timeout/retries: {exc}") from exc
    if not 0 < timeout <= 3600 or not 0 <= retries <= 10:
        raise UsageError("config [cache]: timeout must be in (0, 3600] s, retries in [0, 10]")
    sign_key, trusted = _signing(args, env, conf)
    settings = RemoteSettings(
        sources=tuple(sources),
        target=target,
        scope=str(scope) if scope else None,
        strict=bool(strict),
        timeout_s=timeout,
        connect_timeout_s=min(3.0, timeout),
        retries=retries,
        insecure=insecure,
        sign_key=sign_key,
        trusted=trusted,
    )
    return settings


def _signing(
    args: argparse.Namespace, env: Mapping[str, str], conf: Mapping[str, Any]
) -> tuple[SecretKey | None, tuple[PublicKey, ...]]:
    """The signing key and the trusted keys (the signing key's own public key among them)."""
    if not (
        getattr(args, "cache_trust", None)
        or env.get("RFS_CACHE_TRUST", "").strip()
        or conf.get("trusted_keys")
        or getattr(args, "cache_sign_key", None)
        or env.get("RFS_CACHE_SIGN_KEY")
    ):
        return None, ()  # nothing to sign or check: not even the import (4 ms) is paid
    from rfs.remote.signing import load_secret_key, parse_public_keys, split_keys

    flags = getattr(args, "cache_trust", None)
    if flags:
        trusted = parse_public_keys(flags, "--cache-trust")
    elif env.get("RFS_CACHE_TRUST", "").strip():
        trusted = parse_public_keys(split_keys(env["RFS_CACHE_TRUST"]), "RFS_CACHE_TRUST")
    else:
        listed = conf.get("trusted_keys", [])
        if isinstance(listed, str):
            listed = split_keys(listed)
        if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
            raise UsageError(
                f"{config_path(env)}: [cache] trusted_keys must be a list of public keys"
            )
        trusted = parse_public_keys(listed, f"{config_path(env)}: trusted_keys")
    path = getattr(args, "cache_sign_key", None)
    where = "--cache-sign-key"
    if not path and env.get("RFS_CACHE_SIGN_KEY"):
        path, where = env["RFS_CACHE_SIGN_KEY"], "RFS_CACHE_SIGN_KEY"
    sign_key = load_secret_key(Path(path), where) if path else None
    if sign_key is not None and sign_key.public() not in trusted:
        # A writer that signs trusts what it signed, and so never builds on an unsigned
        # record (which anyone able to write to the server could have put there).
        trusted = (*trusted, sign_key.public())
    return sign_key, trusted
