"""Who is calling: an API key, or a client certificate presented in the TLS handshake (mutual TLS).

Uvicorn verifies the client certificate against the configured CA but does not tell the application
which certificate it was.  :class:`TlsScopeH11Protocol` (pass it as ``http=`` to ``uvicorn.Config`` or
``uvicorn.run``; :func:`uvicorn_tls_options` does) fills the ASGI TLS extension
(https://asgi.readthedocs.io/en/latest/specs/tls.html) into every request's scope,
``scope["extensions"]["tls"]``, from the connection's ``ssl_object``.  :class:`ClientAuth` then maps the
certificate — by the SHA-256 fingerprint of its DER, as ``openssl x509 -fingerprint -sha256`` prints
it — to roles, as API keys are mapped to roles.  The certificate is trusted because the TLS layer
verified it (chain to ``ssl_ca_certs``, dates); the mapping says which client it is.  Headers set by
a proxy (``X-SSL-Client-Cert``...) are never trusted here: TLS must end at uvicorn.

Modes (``GATEWAY_AUTH``): ``api-key`` (the default: keys only, no client certificate requested),
``client-cert`` (certificates only, required in the handshake), ``both`` (either is accepted: a
certificate is requested but optional; a presented API key is checked first and must be valid).
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Literal, cast

from cryptography import x509
from fastapi import FastAPI, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.api.outcomes import ApiError
from gateway.settings import SettingsError, parse_roles

__all__ = [
    "AUTH_MODES",
    "ClientAuth",
    "TlsScopeH11Protocol",
    "Unauthenticated",
    "authenticate",
    "certificate_name",
    "client_id",
    "fingerprint",
    "install",
    "key_name",
    "normal_fingerprint",
    "parse_client_certificates",
    "peer_certificate",
    "tls_extension",
    "uvicorn_tls_options",
]

AuthMode = Literal["api-key", "client-cert", "both"]
AUTH_MODES: tuple[AuthMode, ...] = ("api-key", "client-cert", "both")
StrPath = str | PathLike[str]

# TLS versions and the TLS 1.3 / common TLS 1.2 cipher suites as the ASGI extension wants them (IANA numbers)
_TLS_VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303, "TLSv1.1": 0x0302, "TLSv1": 0x0301}
_CIPHER_SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B,
    "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
    "ECDHE-RSA-AES128-GCM-SHA256": 0xC02F,
    "ECDHE-RSA-AES256-GCM-SHA384": 0xC030,
    "ECDHE-ECDSA-CHACHA20-POLY1305": 0xCCA9,
    "ECDHE-RSA-CHACHA20-POLY1305": 0xCCA8,
}


class Unauthenticated(ApiError):
    """A 401 with why, from a closed set (``invalid-api-key``, ``unknown-certificate``, ``no-credentials``):
    the refusal is audited and counted by that reason (:mod:`gateway.api.logins`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(401, "login", message)
        self.reason = reason


def fingerprint(der: bytes) -> str:
    """SHA-256 of the certificate's DER, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normal_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as lower-case hex: colons and openssl's ``sha256 Fingerprint=`` prefix dropped."""
    value = text.strip().lower().replace(":", "")
    if value.startswith("sha256="):  # openssl x509 -fingerprint -sha256 prints "sha256 Fingerprint=AB:CD..."
        value = value[7:]
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise SettingsError(f"client certificate fingerprint {text.strip()[:20]!r}...: not a SHA-256 (64 hex digits)")
    return value


def parse_client_certificates(text: str) -> dict[str, frozenset[str]]:
    """``fingerprint:role+role`` items separated by commas or new lines (``#`` comments); the fingerprint
    is the certificate's SHA-256, hex, with or without colons (the roles follow the *last* colon)."""
    return parse_roles(text, "client certificate fingerprint", normal_fingerprint)


def peer_certificate(scope: Mapping[str, Any]) -> bytes | None:
    """The DER of the verified client certificate of this request (ASGI TLS extension), if any."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not isinstance(tls, Mapping) or tls.get("client_cert_error"):
        return None
    chain = list(tls.get("client_cert_chain") or ())
    if not chain:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(str(chain[0]))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How callers authenticate: the mode, and the client certificates known (fingerprint → roles)."""

    mode: AuthMode = "api-key"
    certificates: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in AUTH_MODES:
            raise SettingsError(f"GATEWAY_AUTH must be one of {', '.join(AUTH_MODES)}, not {self.mode!r}")
        if self.mode != "api-key" and not self.certificates:
            raise SettingsError(f"GATEWAY_AUTH={self.mode} needs GATEWAY_CLIENT_CERTS (fingerprint:roles)")

    @property
    def cert_reqs(self) -> ssl.VerifyMode:
        """What the TLS server asks of clients in this mode."""
        return {"api-key": ssl.CERT_NONE, "client-cert": ssl.CERT_REQUIRED, "both": ssl.CERT_OPTIONAL}[self.mode]

    def roles(
        self, scope: Mapping[str, Any], api_key: str | None, api_keys: Mapping[str, frozenset[str]]
    ) -> frozenset[str]:
        """The caller's roles, or a 401 ``ApiError``.  A presented API key must be valid (no fall-back to the
        certificate when a wrong key is sent); without a key, a mapped client certificate authenticates."""
        if self.mode != "client-cert" and api_key:
            if api_key in api_keys:
                return api_keys[api_key]
            raise Unauthenticated("invalid-api-key", "authentication required: this API key is not valid")
        if self.mode != "api-key":
            der = peer_certificate(scope)
            if der is not None:
                roles = self.certificates.get(fingerprint(der))
                if roles:
                    return roles
                raise Unauthenticated(
                    "unknown-certificate", f"client certificate {fingerprint(der)[:16]}… is not authorised here"
                )
        wanted = {"api-key": "a valid API key", "client-cert": "a known client certificate"}.get(
            self.mode, "a valid API key or a known client certificate"
        )
        raise Unauthenticated("no-credentials", f"authentication required: {wanted}")


def install(app: FastAPI, client_auth: ClientAuth) -> None:
    """Make ``app`` authenticate callers as ``client_auth`` says (without it: API keys only)."""
    app.state.client_auth = client_auth


def _client_auth(request: Request) -> ClientAuth:
    client_auth = getattr(request.app.state, "client_auth", None)
    return client_auth if isinstance(client_auth, ClientAuth) else ClientAuth()


def authenticate(request: Request, api_key: str | None, api_keys: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The ``caller`` dependency's decision, with the app's :class:`ClientAuth` (see :func:`install`)."""
    return _client_auth(request).roles(request.scope, api_key, api_keys)


def client_id(request: Request, api_key: str | None) -> str:
    """A stable, non-secret name for the client that :func:`authenticate` let in (whose letters are whose):
    ``client-`` + the API key's hash when a key decides (as before), ``cert-`` + the certificate's
    fingerprint when the certificate does."""
    mode = _client_auth(request).mode
    if mode != "client-cert" and api_key:
        return key_name(api_key)
    der = peer_certificate(request.scope) if mode != "api-key" else None
    if der is not None:
        return certificate_name(fingerprint(der))
    return key_name("")


def key_name(api_key: str) -> str:
    """An API key's client name: ``client-`` + 12 hex of its SHA-256 (the key itself is never written)."""
    return "client-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def certificate_name(fingerprint: str) -> str:
    """A client certificate's name: ``cert-`` + the first 16 hex of its SHA-256 fingerprint."""
    return "cert-" + fingerprint[:16]


@functools.lru_cache(maxsize=8)
def _server_cert(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    end = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    return text[start : text.index(end, start) + len(end)] + "\n" if start >= 0 and end in text[start:] else None


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket, server_cert_file: str | None = None) -> dict[str, Any]:
    """The ASGI TLS extension for a connection (the peer's leaf certificate only: Python < 3.13 gives no chain)."""
    der = ssl_object.getpeercert(binary_form=True)
    chain, name = [], None
    if der:
        chain = [ssl.DER_cert_to_PEM_cert(der)]
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    cipher = ssl_object.cipher()
    return {
        "server_cert": _server_cert(server_cert_file) if server_cert_file else None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,  # the handshake already refused a certificate that did not verify
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _CIPHER_SUITES.get(cipher[0]) if cipher else None,
    }


class _WithTls:
    """ASGI wrapper adding one connection's TLS extension to each scope it serves."""

    def __init__(self, app: Any, tls: dict[str, Any]) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": self.tls}}
        await self.app(scope, receive, send)


class TlsScopeH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, plus ``scope["extensions"]["tls"]`` on TLS connections.

    The peer certificate is fixed for a connection (TLS 1.3 has no renegotiation; Python servers do
    not renegotiate), so it is read once when the connection is made — after the handshake — and
    every request on that connection gets it."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            certfile = self.config.ssl_certfile
            tls = tls_extension(ssl_object, str(certfile) if certfile else None)
            self.app = cast(Any, _WithTls(self.config.loaded_app, tls))


def uvicorn_tls_options(
    cert_file: StrPath,
    key_file: StrPath | None,
    ca_file: StrPath | None,
    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``: HTTPS with the server certificate and
    key, client certificates verified against ``ca_file`` as ``cert_reqs`` says, and the TLS scope
    extension (:class:`TlsScopeH11Protocol`)."""
    if cert_reqs != ssl.CERT_NONE and not ca_file:
        raise SettingsError("client certificates are requested: GATEWAY_TLS_CA_FILE (the CAs that sign them) is needed")
    for path in (cert_file, key_file, ca_file):
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise SettingsError(f"TLS: {path}: {exc.strerror}") from None
    return {
        "ssl_certfile": str(cert_file),
        "ssl_keyfile": str(key_file) if key_file else None,
        "ssl_ca_certs": str(ca_file) if ca_file else None,
        "ssl_cert_reqs": int(cert_reqs),
        "http": TlsScopeH11Protocol,
    }
