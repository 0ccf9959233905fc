"""Settings: one typed object, read from ``GATEWAY_*`` environment variables when asked for.

Nothing reads the environment at import time; callers build a :class:`Settings` (``Settings.from_env()``)
and pass it down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import GatewayError

__all__ = ["Settings", "SettingsError"]

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
        return cls(max_bytes, Path(overlay) if overlay else None, zone, strict, public_url)
