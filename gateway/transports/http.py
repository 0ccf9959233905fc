"""FHIR REST transport: ``POST {endpoint}/$process-message`` with httpx.

The response decides: HTTP 200 with a response message whose ``MessageHeader.response.code`` is
``ok`` → acknowledged; ``transient-error``, 429, 5xx, timeouts and connection failures → retry
(``Retry-After`` honoured); ``fatal-error`` and other 4xx → permanent.

Mutual TLS: :func:`tls_context` builds the client context (the CAs that sign recipients' server
certificates, and the gateway's own client certificate and key) and :class:`HttpTransport` uses it.
A recipient whose server certificate we cannot verify is *permanent* (as in the MSSanté transport):
health data goes only to a far end we trust, resending to the same certificate cannot succeed, and a
person must look (a misconfiguration, or someone in the middle) before replaying the dead letter.  A
recipient that refuses *our* certificate is *transient*: the message is not at fault and goes through
unchanged once a certificate or trust store is fixed — and under TLS 1.3 the refusal comes after the
handshake as a plain closed connection, which cannot be told from a dropped one (the outcome says so);
the retry budget still ends in a visible dead letter.  Other TLS failures are transient, with the reason.

The payload is the sealed message as FHIR JSON, or that message encrypted for the recipient
(``application/jose``, :mod:`gateway.crypt`); the caller says which with ``content_type``.
"""

from __future__ import annotations

import ssl
from os import PathLike

import httpx
import orjson

from gateway.settings import SettingsError
from gateway.transports.base import FHIR_JSON, Outcome

__all__ = ["HttpTransport", "tls_context"]

JOSE = "application/jose"
JOSE_JSON = "application/jose+json"
StrPath = str | PathLike[str]


def tls_context(
    ca_file: StrPath | None, cert_file: StrPath | None = None, key_file: StrPath | None = None
) -> ssl.SSLContext:
    """A client TLS context: trust ``ca_file`` (PEM bundle; the system store when ``None``), present
    ``cert_file``/``key_file`` (PEM; the key may sit in ``cert_file``) for mutual TLS, TLS 1.2 at least."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except FileNotFoundError as exc:
        raise SettingsError(f"TLS: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"TLS: cannot load the CA file, certificate or key: {exc}") from None
    if key_file and not cert_file:
        raise SettingsError("TLS: a client key without its certificate")
    return context


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: let the backoff decide


def _tls_failure(exc: BaseException) -> Outcome | None:
    """The outcome of a transport error that is a TLS failure (``None`` if TLS is not what failed)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return Outcome("permanent", f"server certificate not trusted: {seen.verify_message}")
        if isinstance(seen, ssl.SSLError):  # an alert from the server: it refused our certificate...
            return Outcome("transient", f"TLS handshake failed: {seen.reason or seen.strerror or type(seen).__name__}")
        seen = seen.__cause__ or seen.__context__
    return None


class HttpTransport:
    media_types = frozenset({FHIR_JSON, JOSE, JOSE_JSON})

    def __init__(self, *, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
        # httpx's transport (its connection pool) without the Client around it: a delivery needs no
        # cookies, redirects or auth flow, and those layers cost a third of each send's CPU
        self.pool = httpx.HTTPTransport(verify=tls if tls is not None else True)
        self.timeout = httpx.Timeout(timeout).as_dict()

    def _post(self, url: str, payload: bytes, content_type: str) -> httpx.Response:
        request = httpx.Request(
            "POST",
            url,
            content=payload,
            headers={"Content-Type": content_type, "Accept": FHIR_JSON},
            extensions={"timeout": self.timeout},
        )
        response = self.pool.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return response

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = FHIR_JSON) -> Outcome:
        url = endpoint.rstrip("/") + "/$process-message"
        try:
            response = self._post(url, payload, content_type)
        except httpx.TimeoutException:
            return Outcome("transient", "timeout")
        except httpx.TransportError as exc:
            refused = _tls_failure(exc)
            if refused is not None:
                return refused
            if isinstance(exc, httpx.RemoteProtocolError) and url.startswith("https:"):
                return Outcome(
                    "transient",
                    "connection failed: the server closed it without answering "
                    "(under TLS 1.3 this is also how a refused client certificate shows)",
                )
            return Outcome("transient", f"connection failed: {type(exc).__name__}")
        if response.status_code == 429 or response.status_code >= 500:
            return Outcome("transient", f"HTTP {response.status_code}", _retry_after(response))
        if response.status_code != 200:
            return Outcome("permanent", f"HTTP {response.status_code}: {_diagnostics(response.content)}")
        try:
            answer = orjson.loads(response.content)
            header = answer["entry"][0]["resource"]
            code = header["response"]["code"]
            answered = header["response"]["identifier"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return Outcome("transient", "HTTP 200 without a readable response message")
        if answered != message_id:
            return Outcome("transient", f"response is for another message ({answered})")
        if code == "ok":
            return Outcome("ok", "acknowledged")
        if code == "transient-error":
            return Outcome("transient", "receiver answered transient-error", _retry_after(response))
        return Outcome("permanent", f"receiver answered {code}")

    def close(self) -> None:
        self.pool.close()


def _diagnostics(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        return str(data["issue"][0].get("diagnostics", ""))[:200]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
