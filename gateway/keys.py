"""The gateway's signing keys on disk: generate, rotate, show, and read trusted public keys.

The gateway signs every message (detached JWS ES256, :mod:`gateway.seal`) and every audit checkpoint
(:mod:`gateway.auditlog`) with one P-256 key.  A key directory holds::

    signing-key.jwk       the current private key (mode 0600) — GATEWAY_SIGNING_KEY_FILE points here
    signing-key.pub.jwk   its public half, to hand to receivers
    keys.jwks             the public keyring: the current key first, then every earlier one
    archive/<kid>.jwk     earlier private keys (mode 0600), kept, never deleted by the gateway

Why a keyring: receivers and auditors must still verify what was signed before a rotation (an audit
chain's old checkpoints, a message being re-checked), so rotation keeps the old *public* key in
``keys.jwks`` and moves the old *private* key aside instead of deleting it.  ``generate --force``
starts a new keyring on purpose (a compromised key must stop being trusted), still archiving the
private key it replaces.  A new key's ``kid`` is its RFC 7638 thumbprint — also what a PEM key gets —
so the same key has the same ``kid`` wherever it is loaded from; a JWK's own ``kid`` is kept.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from gateway.errors import IngestError, Where
from gateway.seal import generate_key

__all__ = [
    "ARCHIVE",
    "CURRENT",
    "KEYRING",
    "PUBLIC",
    "KeyFileError",
    "Keyring",
    "generate",
    "load_public_keys",
    "public_jwk",
    "read_keyring",
    "rotate",
]

CURRENT, PUBLIC, KEYRING, ARCHIVE = "signing-key.jwk", "signing-key.pub.jwk", "keys.jwks", "archive"


class KeyFileError(IngestError):
    """A key file that is missing, unreadable, not P-256, or that would be overwritten."""

    issue_code = "security"


def public_jwk(key: ECKey) -> dict[str, Any]:
    """The public JWK as published: ``kid``, ``alg`` and ``use`` say what it is for.  The ``kid`` is the
    one the key signs with: its thumbprint, unless a JWK brought its own (kept, or old signatures break)."""
    data = {k: v for k, v in key.as_dict(private=False).items() if k not in ("d", "alg", "use", "kid")}
    return {**data, "kid": str(key.kid or key.thumbprint()), "alg": "ES256", "use": "sig"}


def _private_jwk(key: ECKey) -> dict[str, Any]:
    return {**public_jwk(key), **{k: v for k, v in key.as_dict(private=True).items() if k == "d"}}


def _key_from(data: Any, source: str) -> ECKey:
    try:
        key = ECKey.import_key(data)
    except (ValueError, TypeError, JoseError) as exc:
        raise KeyFileError(f"not a P-256 key ({str(exc).splitlines()[0][:80]})", where=Where(source=source)) from None
    if key.curve_name != "P-256":
        raise KeyFileError(f"a {key.curve_name} key: the gateway signs with P-256 (ES256)", where=Where(source=source))
    key.ensure_kid()  # a PEM carries none: the RFC 7638 thumbprint, as gateway.seal.load_key gives it
    return key


def load_public_keys(data: bytes, source: str = "key") -> list[ECKey]:
    """Trusted public keys from a JWKS (``{"keys": [...]}``), a JWK or a PEM file's bytes.

    A private key given as a trust anchor is reduced to its public half: trusting must never need,
    nor keep in memory, the secret."""
    if data.lstrip()[:1] == b"{":
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise KeyFileError(f"malformed JSON: {exc}", where=Where(source=source)) from None
        items = parsed.get("keys") if isinstance(parsed, dict) and "keys" in parsed else [parsed]
        if not isinstance(items, list) or not items:
            raise KeyFileError("a JWKS with no key in it", where=Where(source=source))
        keys = [_key_from(item, f"{source} key {n}") for n, item in enumerate(items, 1)]
    else:
        keys = [_key_from(data, source)]
    return [ECKey.import_key(public_jwk(k)) for k in keys]


def load_private_key(path: Path) -> ECKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            "no signing key here: run `gateway keys generate` first", where=Where(source=str(path))
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the key: {exc.strerror}", where=Where(source=str(path))) from None
    key = _key_from(orjson.loads(data) if data.lstrip()[:1] == b"{" else data, str(path))
    if not key.is_private:
        raise KeyFileError("a public key: the gateway needs its private key to sign", where=Where(source=str(path)))
    return key


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` from its creation on (a secret is never briefly readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never wider than asked
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _dump(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"


@dataclass(frozen=True, slots=True)
class Keyring:
    """What a key directory holds."""

    directory: Path
    current: str | None  # kid of signing-key.jwk, None without one
    public: tuple[str, ...]  # kids in keys.jwks, current first
    archived: tuple[str, ...]  # kids of the private keys in archive/
    loose_modes: tuple[str, ...]  # private key files readable by others than their owner

    @property
    def private_path(self) -> Path:
        return self.directory / CURRENT

    @property
    def keyring_path(self) -> Path:
        return self.directory / KEYRING


def _read_jwks(path: Path) -> list[ECKey]:
    if not path.exists():
        return []
    return load_public_keys(path.read_bytes(), str(path))


def _write_keyring(directory: Path, keys: Sequence[ECKey]) -> None:
    unique = list({str(k.kid): k for k in keys}.values())
    _write(directory / KEYRING, _dump({"keys": [public_jwk(k) for k in unique]}), 0o644)


def _archive(directory: Path, key: ECKey) -> Path:
    """Keep a retired private key (0600, in a 0700 directory); an identical copy already there is fine."""
    folder = directory / ARCHIVE
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    target = folder / f"{key.thumbprint()}.jwk"
    if not target.exists():
        _write(target, _dump(_private_jwk(key)), 0o600)
    return target


@dataclass(frozen=True, slots=True)
class Written:
    """What a generate or rotate did, for the operator's summary."""

    kid: str
    private: Path
    public: Path
    keyring: Path
    archived: Path | None = None  # where the replaced private key went
    previous: str | None = None  # its kid
    trusted: tuple[str, ...] = ()  # kids in the keyring afterwards


def generate(directory: Path, *, force: bool = False) -> Written:
    """A new current key and a new keyring holding only it.  Refuses to replace a key unless ``force``;
    the replaced private key is then archived, and drops out of the keyring (start over: e.g. after a
    compromise, when the old key must no longer be trusted)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / CURRENT
    previous: ECKey | None = None
    if private.exists():
        previous = load_private_key(private) if force else None
        if not force:
            raise KeyFileError(
                "a signing key exists: `gateway keys rotate` replaces it and keeps it verifiable; "
                "--force starts a new keyring (the old key is archived)",
                where=Where(source=str(private)),
            )
    key = generate_key()
    archived = _archive(directory, previous) if previous is not None else None
    _write_keyring(directory, [key])
    _write(directory / PUBLIC, _dump(public_jwk(key)), 0o644)
    _write(private, _dump(_private_jwk(key)), 0o600)
    return Written(
        str(key.kid),
        private,
        directory / PUBLIC,
        directory / KEYRING,
        archived,
        str(previous.kid) if previous is not None else None,
        (str(key.kid),),
    )


def rotate(directory: Path) -> Written:
    """A new current key; the previous one stays verifiable (public key in the keyring) and its private
    key is archived.  Each step leaves a usable directory if the next one fails: archive first, then the
    keyring, then the current key."""
    private = directory / CURRENT
    old = load_private_key(private)
    key = generate_key()
    archived = _archive(directory, old)
    ring = [key, old, *_read_jwks(directory / KEYRING)]
    _write_keyring(directory, ring)
    _write(directory / PUBLIC, _dump(public_jwk(key)), 0o644)
    _write(private, _dump(_private_jwk(key)), 0o600)
    trusted = tuple(dict.fromkeys(str(k.kid) for k in ring))
    return Written(str(key.kid), private, directory / PUBLIC, directory / KEYRING, archived, str(old.kid), trusted)


def read_keyring(directory: Path) -> Keyring:
    """The state of a key directory (nothing is changed)."""
    if not directory.is_dir():
        raise KeyFileError("not a key directory", where=Where(source=str(directory)))
    private = directory / CURRENT
    current = str(load_private_key(private).kid) if private.exists() else None
    public = tuple(str(k.kid) for k in _read_jwks(directory / KEYRING))
    folder = directory / ARCHIVE
    archived = tuple(sorted(str(load_private_key(p).kid) for p in folder.glob("*.jwk"))) if folder.is_dir() else ()
    secrets = [private, *(folder.glob("*.jwk") if folder.is_dir() else [])]
    loose = tuple(
        str(p) for p in secrets if p.exists() and stat.S_IMODE(p.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO)
    )
    return Keyring(directory, current, public, archived, loose)
