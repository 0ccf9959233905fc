"""Settings: one typed object, read from ``GATEWAY_*`` environment variables when asked for.

Nothing reads the environment at import time; callers build a :class:`Settings` (``Settings.from_env()``)
and pass it down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import GatewayError

__all__ = ["Settings", "SettingsError", "parse_api_keys"]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_ZONE = "Europe/Paris"
DEFAULT_PUBLIC_URL = "https://discharge-gateway.localhost/fhir"


class SettingsError(GatewayError):
    issue_code = "exception"


@dataclass(frozen=True, slots=True)
class Settings:
    max_document_bytes: int = DEFAULT_MAX_BYTES
    mappings_overlay: Path | None = None
    default_timezone: str = DEFAULT_ZONE
    strict_validation: bool = False  # also run the (slow) fhir.resources models on every resource
    public_url: str = DEFAULT_PUBLIC_URL  # the gateway's own FHIR endpoint (MessageHeader.source.endpoint)
    database_url: str = "sqlite:///gateway.db"
    api_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)  # key -> roles
    signing_key_file: Path | None = None  # the gateway's P-256 signing key (JWK or PEM)
    retry_max_attempts: int = 8  # attempts per delivery before it is dead-lettered
    retry_initial_seconds: float = 2.0  # first backoff; doubles each attempt (with jitter) up to retry_max_seconds
    retry_max_seconds: float = 600.0
    claim_lease_seconds: float = 120.0  # a claim older than this (a crashed worker) is taken back
    delivery_threads: int = 4  # delivery worker threads per gateway process
    audit_checkpoint_seconds: float = 60.0  # sign the audit head at least this often while it moves
    # the API over HTTPS, and how HIS clients authenticate (api-key | client-cert | both)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # CAs that sign HIS client certificates
    auth_mode: str = "api-key"
    client_certs: Mapping[str, frozenset[str]] = field(default_factory=dict)  # SHA-256 fingerprint -> roles
    # our client certificate towards recipients' $process-message endpoints (mutual TLS)
    out_tls_cert_file: Path | None = None
    out_tls_key_file: Path | None = None
    out_tls_ca_file: Path | None = None  # CAs for recipients' servers (unset: the system store)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        try:
            max_bytes = int(env.get("GATEWAY_MAX_DOCUMENT_BYTES", DEFAULT_MAX_BYTES))
        except ValueError:
            raise SettingsError("GATEWAY_MAX_DOCUMENT_BYTES must be an integer") from None
        if max_bytes <= 0:
            raise SettingsError("GATEWAY_MAX_DOCUMENT_BYTES must be positive")
        overlay = env.get("GATEWAY_MAPPINGS_OVERLAY")
        zone = env.get("GATEWAY_DEFAULT_TIMEZONE", DEFAULT_ZONE)
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"GATEWAY_DEFAULT_TIMEZONE {zone!r} is not a known time zone") from None
        strict = env.get("GATEWAY_STRICT_VALIDATION", "").lower() in ("1", "true", "yes")
        public_url = env.get("GATEWAY_PUBLIC_URL", DEFAULT_PUBLIC_URL)
        if not public_url.startswith(("https://", "http://")):
            raise SettingsError("GATEWAY_PUBLIC_URL must be an http(s) URL")
        keys_text = env.get("GATEWAY_API_KEYS", "")
        keys_file = env.get("GATEWAY_API_KEYS_FILE")
        if keys_file:
            try:
                keys_text = Path(keys_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise SettingsError(f"GATEWAY_API_KEYS_FILE: {exc.strerror}") from None
        return cls(
            max_bytes,
            Path(overlay) if overlay else None,
            zone,
            strict,
            public_url,
            env.get("GATEWAY_DATABASE_URL", "sqlite:///gateway.db"),
            parse_api_keys(keys_text),
            Path(env["GATEWAY_SIGNING_KEY_FILE"]) if env.get("GATEWAY_SIGNING_KEY_FILE") else None,
            retry_max_attempts=int(_positive(env, "GATEWAY_RETRY_MAX_ATTEMPTS", 8)),
            retry_initial_seconds=_positive(env, "GATEWAY_RETRY_INITIAL_SECONDS", 2.0),
            retry_max_seconds=_positive(env, "GATEWAY_RETRY_MAX_SECONDS", 600.0),
            claim_lease_seconds=_positive(env, "GATEWAY_CLAIM_LEASE_SECONDS", 120.0),
            delivery_threads=int(_positive(env, "GATEWAY_DELIVERY_THREADS", 4)),
            audit_checkpoint_seconds=_positive(env, "GATEWAY_AUDIT_CHECKPOINT_SECONDS", 60.0),
            tls_cert_file=_path(env, "GATEWAY_TLS_CERT_FILE"),
            tls_key_file=_path(env, "GATEWAY_TLS_KEY_FILE"),
            tls_ca_file=_path(env, "GATEWAY_TLS_CA_FILE"),
            auth_mode=env.get("GATEWAY_AUTH", "api-key"),
            client_certs=_client_certs(env),
            out_tls_cert_file=_path(env, "GATEWAY_OUT_TLS_CERT_FILE"),
            out_tls_key_file=_path(env, "GATEWAY_OUT_TLS_KEY_FILE"),
            out_tls_ca_file=_path(env, "GATEWAY_OUT_TLS_CA_FILE"),
        )


def _path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]) if env.get(name) else None


def _client_certs(env: Mapping[str, str]) -> dict[str, frozenset[str]]:
    from gateway.api.auth import parse_client_certificates  # auth imports this module

    text = env.get("GATEWAY_CLIENT_CERTS", "")
    if env.get("GATEWAY_CLIENT_CERTS_FILE"):
        try:
            text = Path(env["GATEWAY_CLIENT_CERTS_FILE"]).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"GATEWAY_CLIENT_CERTS_FILE: {exc.strerror}") from None
    return parse_client_certificates(text)


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, default))
    except ValueError:
        raise SettingsError(f"{name} must be a number") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive")
    return value


def parse_api_keys(text: str) -> dict[str, frozenset[str]]:
    """``key:role+role`` items separated by commas or new lines (a file keeps keys out of the environment)."""
    keys: dict[str, frozenset[str]] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key, _, roles = item.partition(":")
        if len(key) < 16:
            raise SettingsError("API keys must be at least 16 characters long")
        known = {"admin", "auditor", "his"}
        wanted = frozenset(r for r in roles.split("+") if r)
        if not wanted or wanted - known:
            raise SettingsError(f"API key roles must be among {sorted(known)}")
        keys[key.strip()] = wanted
    return keys
