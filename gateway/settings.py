"""Settings: one typed object (pydantic-settings), read from ``GATEWAY_*`` environment variables when asked for.

Nothing reads the environment at import time or on construction: ``Settings(...)`` takes only its
arguments (tests, the demo), and :meth:`Settings.from_env` reads the environment.  Every variable may
instead name a file with ``GATEWAY_<NAME>_FILE`` (Docker / Kubernetes secrets: API keys, database URL
with its password), never both.  ``gateway config`` prints the table the README shows.

Outside demo mode (``GATEWAY_MODE=production``, the default) the gateway refuses to start with the
published demo secrets of ``docker/demo/`` or without a signing key of its own: a throw-away key would
make every earlier audit checkpoint and message signature unverifiable after a restart.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from gateway.errors import GatewayError

__all__ = [
    "DEMO_API_KEY_DIGESTS",
    "DEMO_KEY_THUMBPRINTS",
    "Settings",
    "SettingsError",
    "env_names",
    "loopback",
    "parse_api_keys",
    "parse_roles",
    "parse_sender_organizations",
    "refuse_demo_secrets",
]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_ZONE = "Europe/Paris"
DEFAULT_PUBLIC_URL = "https://discharge-gateway.localhost/fhir"
PREFIX = "GATEWAY_"
ROLES = frozenset({"admin", "auditor", "his"})

# SHA-256 of the API keys published in docker/demo/ (never the keys themselves in code): a production
# gateway refuses them.  The demo signing key is recognised by its RFC 7638 thumbprint.
DEMO_API_KEY_DIGESTS = frozenset(
    {
        "850b48d4fb2072f319d116b5e33cf761273c1ae354ef68d415a2ba393bdc586d",
        "406989f0020a46ed8ec928a297df0f357e36af5b15be84d942d7b0400b211cbc",
        "1dc87e98f91bf2ea2d92f7ccdd5ec83c2435488ba98fd3af340b06604a7f8aac",
    }
)
DEMO_KEY_THUMBPRINTS = frozenset({"KgPaUduTWDs7ZN3_pGUTmDOu5_rGsKxnJn7ctQL_zTE"})


class SettingsError(GatewayError):
    issue_code = "exception"


def parse_roles(text: str, what: str, check_key: Any = None) -> dict[str, frozenset[str]]:
    """``key:role+role`` items separated by commas or new lines (``#`` comments): the one format of
    ``GATEWAY_API_KEYS`` and ``GATEWAY_CLIENT_CERTS``; roles follow the *last* colon."""
    mapping: dict[str, frozenset[str]] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key, _, roles = item.rpartition(":")
        wanted = frozenset(r for r in roles.split("+") if r)
        if not key.strip() or not wanted or wanted - ROLES:
            raise SettingsError(f"{what} roles must be among {sorted(ROLES)} ({what.split()[-1]}:role+role)")
        key = check_key(key.strip()) if check_key else key.strip()
        mapping[key] = wanted
    return mapping


ANY_ORGANIZATION = ("*", "*")  # a sender bound to every establishment (a regional interface engine)
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HEX = re.compile(r"^[0-9a-f]+$")


def _sender_name(text: str) -> str:
    """A sender as the gateway names it: ``client-`` + 12 hex (an API key's SHA-256), ``cert-`` + 16 hex (a
    client certificate's fingerprint; the whole fingerprint, with or without colons, is cut to that), or
    ``mllp:`` + a sending facility (MSH-4) for plain MLLP, which authenticates nobody."""
    name = text.strip()
    low = name.lower()
    if low.startswith("mllp:") and name[5:].strip():
        return "mllp:" + name[5:].strip()
    bare = low.removeprefix("cert-").replace(":", "")
    if (low.startswith("cert-") or len(bare) == 64) and len(bare) in (16, 64) and _HEX.match(bare):
        return "cert-" + bare[:16]
    if low.startswith("client-") and len(low) == 19 and _HEX.match(low[7:]):
        return low
    raise SettingsError(
        f"sender {name!r} is not client-<12 hex> (an API key's name), cert-<fingerprint> or mllp:<MSH-4>"
    )


def _organization(token: str) -> tuple[str, str]:
    """``system|value`` (a bare OID system is ``urn:oid:<OID>``, as a CDA ``root`` becomes), an OID alone
    (an organisation identified by its OID, a CDA id without extension), or ``*``."""
    token = token.strip()
    if token == "*":
        return ANY_ORGANIZATION
    system, bar, value = token.partition("|")
    system, value = system.strip(), value.strip()
    if not bar:
        oid = system.removeprefix("urn:oid:")
        if _OID.match(oid):
            return ("urn:ietf:rfc:3986", f"urn:oid:{oid}")
    elif system and value:
        return (f"urn:oid:{system}" if _OID.match(system) else system, value)
    raise SettingsError(f"organisation {token!r} is not system|value, an OID, or *")


def parse_sender_organizations(text: str) -> dict[str, frozenset[tuple[str, str]]]:
    """``sender = organisation + organisation`` items separated by commas or new lines (``#`` comments):
    the establishments (custodians) each sender may send letters for."""
    mapping: dict[str, frozenset[tuple[str, str]]] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        sender, equal, organizations = item.partition("=")
        wanted = frozenset(_organization(o) for o in organizations.split("+") if o.strip())
        if not equal or not wanted:
            raise SettingsError(f"{item!r}: write sender = organisation + organisation")
        name = _sender_name(sender)
        if name in mapping:
            raise SettingsError(f"sender {name} is listed twice")
        mapping[name] = wanted
    return mapping


def _long_enough(key: str) -> str:
    if len(key) < 16:
        raise SettingsError("API keys must be at least 16 characters long")
    return key


def parse_api_keys(text: str) -> dict[str, frozenset[str]]:
    """``key:role+role`` items (a file, ``GATEWAY_API_KEYS_FILE``, keeps keys out of the environment)."""
    return parse_roles(text, "API key", _long_enough)


Roles = Annotated[dict[str, frozenset[str]], NoDecode]
Senders = Annotated[dict[str, frozenset[tuple[str, str]]], NoDecode]
Names = Annotated[frozenset[str], NoDecode]

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("gateway_environ", default=None)


class _Environment(EnvSettingsSource):
    """The environment given to :meth:`Settings.from_env`, with ``GATEWAY_X_FILE`` resolved into ``GATEWAY_X``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = dict(_ENVIRON.get() or {})
        for name in list(env):
            if not (name.startswith(PREFIX) and name.endswith("_FILE")):
                continue
            target = name[: -len("_FILE")]
            if target not in _FILE_TARGETS:
                continue  # a setting that is itself a path (GATEWAY_SIGNING_KEY_FILE, GATEWAY_TLS_CERT_FILE...)
            if env.get(target):
                raise SettingsError(f"set {target} or {name}, not both")
            try:
                env[target] = Path(env.pop(name)).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"{name}: {exc.strerror}") from None
        return parse_env_vars(env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class Settings(BaseSettings):
    """Everything an operator may configure; each field's description is its line in the README's table."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore", populate_by_name=True)

    mode: Literal["production", "demo"] = Field(
        default="production", description="`demo` accepts the published demo secrets and a throw-away signing key"
    )
    database_url: str = Field(
        default="sqlite:///gateway.db", description="SQLite file or `postgresql://…` (several gateways)"
    )
    api_keys: Roles = Field(
        default_factory=dict,
        description="`key:role+role` (roles `his`, `admin`, `auditor`), comma or newline separated",
    )
    signing_key_file: Path | None = Field(
        default=None, description="the gateway's P-256 key (JWK or PEM): signs messages and audit checkpoints"
    )
    trusted_keys_file: Path | None = Field(
        default=None, description="JWKS of the gateway's earlier public keys (after `gateway keys rotate`)"
    )
    max_document_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0, description="largest letter accepted (bytes)")
    mappings_overlay: Path | None = Field(
        default=None, description="directory of mapping tables overriding the built-in ones"
    )
    default_timezone: str = Field(
        default=DEFAULT_ZONE, description="zone assumed for CDA times written without an offset"
    )
    strict_validation: bool = Field(
        default=False, description="also validate every resource with the fhir.resources models"
    )
    public_url: str = Field(
        default=DEFAULT_PUBLIC_URL, description="the gateway's FHIR endpoint (`MessageHeader.source`)"
    )
    retry_max_attempts: int = Field(default=8, gt=0, description="attempts per delivery before it is dead-lettered")
    retry_initial_seconds: float = Field(
        default=2.0, gt=0, description="first backoff; doubles (with jitter) per attempt"
    )
    retry_max_seconds: float = Field(default=600.0, gt=0, description="longest backoff")
    claim_lease_seconds: float = Field(
        default=120.0, gt=0, description="a claim older than this (a crashed worker) is retaken"
    )
    delivery_threads: int = Field(default=4, gt=0, description="delivery worker threads per gateway process")
    processes: int = Field(
        default=1, gt=0, le=64, description="`gateway serve` processes sharing the port (one per core)"
    )
    ack_timeout_seconds: float = Field(
        default=86400.0,
        gt=0,
        description="a message handed over (`sent`) with no acknowledgement (MDN) after this is dead-lettered",
    )
    audit_checkpoint_seconds: float = Field(
        default=60.0, gt=0, description="sign the audit head at least this often while it moves"
    )
    letter_retention_days: float = Field(
        default=0.0,
        ge=0,
        description="erase a letter's body this long after it was received, once every delivery of it is "
        "final (0: keep)",
    )
    tls_cert_file: Path | None = Field(default=None, description="serve the API over HTTPS with this certificate (PEM)")
    tls_key_file: Path | None = Field(default=None, description="its private key")
    tls_ca_file: Path | None = Field(default=None, description="CAs that sign HIS client certificates")
    auth_mode: str = Field(
        default="api-key",
        validation_alias=AliasChoices("auth_mode", "GATEWAY_AUTH"),
        description="how HIS clients authenticate: `api-key`, `client-cert` or `both` (env `GATEWAY_AUTH`)",
    )
    client_certs: Roles = Field(
        default_factory=dict, description="`sha256-fingerprint:role+role` of accepted client certificates"
    )
    out_tls_cert_file: Path | None = Field(
        default=None, description="our client certificate towards recipients (mutual TLS)"
    )
    out_tls_key_file: Path | None = Field(default=None, description="its private key")
    out_tls_ca_file: Path | None = Field(
        default=None, description="CAs for recipients' servers (default: the system store)"
    )
    recipient_ca_file: Path | None = Field(
        default=None,
        description="authorities recipients' encryption certificates must be issued under (PEM; IGC-Santé): "
        "a certificate published in the directory that does not chain to them is refused, and nothing is "
        "sent in clear instead (default: the directory's certificates are trusted as they are)",
    )
    sender_organizations: Senders = Field(
        default_factory=dict,
        description="the establishments each client may send letters for, `sender = system|value + …` "
        "(sender `client-<12 hex>` for an API key, `cert-<fingerprint>`, or `mllp:<MSH-4>`; `*`: any); once "
        "set, a letter whose custodian is not among its sender's, or from a sender not listed, is refused (403)",
    )
    mllp_port: int | None = Field(
        default=None, gt=0, lt=65536, description="open the HL7 v2 MLLP listener on this port"
    )
    mllp_host: str = Field(default="127.0.0.1", description="address the MLLP listener binds")
    mllp_senders: Names = Field(
        default_factory=frozenset,
        description="sending facilities (MSH-4) allowed over MLLP, comma separated (empty: any)",
    )
    mllp_tls: Literal["off", "client-cert"] = Field(
        default="off",
        description="`client-cert`: MLLP over TLS with the API's certificate (`GATEWAY_TLS_CERT_FILE`), a client "
        "certificate required (chained to `GATEWAY_TLS_CA_FILE`, mapped to `his` in `GATEWAY_CLIENT_CERTS`); "
        "`off`: plain MLLP, for the hospital network only",
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="`json` (one object per line) or `console`"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="least level logged")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _ENVIRON.get() is None:
            return (init_settings,)  # Settings(...) in code: its arguments and the defaults, never the environment
        return (init_settings, _Environment(settings_cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment (or ``environ``) gives; a :class:`SettingsError` naming the variable."""
        with _reading(os.environ if environ is None else environ):
            try:
                return cls()
            except ValidationError as exc:
                error = exc.errors()[0]
                name = str(error["loc"][0]) if error["loc"] else "?"
                variable = name if name.startswith(PREFIX) else _variable(name)
                raise SettingsError(f"{variable}: {error['msg']}") from None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: Any) -> Any:
        return parse_api_keys(value) if isinstance(value, str) else value

    @field_validator("client_certs", mode="before")
    @classmethod
    def _client_certs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        from gateway.api.auth import normal_fingerprint  # auth imports this module

        return parse_roles(value, "client certificate fingerprint", normal_fingerprint)

    @field_validator("sender_organizations", mode="before")
    @classmethod
    def _senders(cls, value: Any) -> Any:
        try:
            return parse_sender_organizations(value) if isinstance(value, str) else value
        except SettingsError as error:
            raise SettingsError(f"GATEWAY_SENDER_ORGANIZATIONS: {error.message}") from None

    @field_validator("mllp_senders", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return frozenset(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known time zone") from None
        return value

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


# the settings whose value may come from a file: every one that is not itself a path
def _variable(field_name: str) -> str:
    """A field's environment variable (``auth_mode`` keeps its historical name, ``GATEWAY_AUTH``)."""
    return PREFIX + ("AUTH" if field_name == "auth_mode" else field_name.upper())


_FILE_TARGETS = frozenset(_variable(name) for name in Settings.model_fields if not name.endswith("_file"))


@contextmanager
def _reading(environ: Mapping[str, str]) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def env_names() -> list[tuple[str, FieldInfo]]:
    """Each setting's environment variable with its field (the README's configuration table)."""
    return [(_variable(name), info) for name, info in Settings.model_fields.items()]


def refuse_demo_secrets(settings: Settings, key_thumbprint: str | None) -> None:
    """Outside demo mode: no published demo secret, and a signing key of the gateway's own."""
    if settings.mode == "demo":
        return
    if any(hashlib.sha256(key.encode()).hexdigest() in DEMO_API_KEY_DIGESTS for key in settings.api_keys):
        raise SettingsError(
            "GATEWAY_API_KEYS holds a published demo key: generate your own (GATEWAY_MODE=demo only for the demo)"
        )
    if key_thumbprint is None:
        raise SettingsError(
            "GATEWAY_SIGNING_KEY_FILE is required outside demo mode (`gateway keys generate`): a throw-away key "
            "would leave earlier audit checkpoints and message signatures unverifiable after a restart"
        )
    if key_thumbprint in DEMO_KEY_THUMBPRINTS:
        raise SettingsError(
            "GATEWAY_SIGNING_KEY_FILE is the published demo key: generate your own with `gateway keys generate`"
        )


def loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is out of the network's reach (plain text is then acceptable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
