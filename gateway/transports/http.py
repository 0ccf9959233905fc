"""FHIR REST transport: ``POST {endpoint}/$process-message`` with httpcore (httpx's connection pool).

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

import httpcore
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


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: let the backoff decide


class _Answer:
    """What :meth:`HttpTransport.send` reads of a response: status, ``Retry-After``, body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    def retry_after(self) -> float | None:
        """``Retry-After`` in seconds, read as httpx's ``Headers.get`` reads it (several values joined)."""
        found = [value for name, value in self.headers if name.lower() == b"retry-after"]
        return _seconds(b", ".join(found).decode(_encoding(self.headers))) if found else None


def _encoding(headers: list[tuple[bytes, bytes]]) -> str:
    """The encoding httpx decodes a response's headers with: ASCII, else UTF-8, else Latin-1."""
    for encoding in ("ascii", "utf-8"):
        try:
            for name, value in headers:
                name.decode(encoding)
                value.decode(encoding)
        except UnicodeDecodeError:
            continue
        return encoding
    return "iso-8859-1"


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
        # httpcore's connection pool, configured as httpx's HTTPTransport configures it (its default limits),
        # without the httpx Request/Response around each send: a delivery needs no cookies, redirects, auth
        # flow or URL parsing per request, and those layers cost half of each send's CPU
        self.pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=tls if tls is not None else True),
            max_connections=100,  # httpx's default limits
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            http1=True,
            http2=False,
            retries=0,
        )
        self.timeout = httpx.Timeout(timeout).as_dict()
        self._targets: dict[str, tuple[httpcore.URL, bytes]] = {}  # per endpoint URL: parsed once

    def _target(self, url: str) -> tuple[httpcore.URL, bytes]:
        """The request URL and its ``Host`` header, as httpx derives them from ``url``."""
        found = self._targets.get(url)
        if found is None:
            parsed = httpx.URL(url)
            target = httpcore.URL(
                scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
            )
            found = (target, parsed.netloc)
            if len(self._targets) < 4096:  # endpoints come from the directory: a bounded set
                self._targets[url] = found
        return found

    def _post(self, url: str, payload: bytes, content_type: str) -> _Answer:
        """POST ``payload``: on the wire exactly what ``httpx.Request("POST", url, content=payload, headers=
        {"Content-Type": ..., "Accept": ...})`` sends — Host, Content-Type, Accept, Content-Length, in that order
        (an empty body: Host, Content-Length, Content-Type, Accept)."""
        target, host = self._target(url)
        headers = [(b"Content-Type", content_type.encode("ascii")), (b"Accept", _ACCEPT)]
        if payload:
            headers = [(b"Host", host), *headers, (b"Content-Length", str(len(payload)).encode("ascii"))]
        else:  # httpx adds an empty body's length with the Host, before the given headers
            headers = [(b"Host", host), (b"Content-Length", b"0"), *headers]
        request = httpcore.Request(
            b"POST", target, headers=headers, content=payload, extensions={"timeout": self.timeout}
        )
        response = self.pool.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        headers = response.headers
        if any(name.lower() == b"content-encoding" for name, _ in headers):  # rare: let httpx decode it
            decoded = httpx.Response(response.status, headers=headers, content=content)
            return _Answer(response.status, headers, decoded.content)
        return _Answer(response.status, headers, content)

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = FHIR_JSON) -> Outcome:
        url = endpoint.rstrip("/") + "/$process-message"
        try:
            response = self._post(url, payload, content_type)
        except httpcore.TimeoutException:
            return Outcome("transient", "timeout")
        except _TRANSPORT_ERRORS as exc:
            refused = _tls_failure(exc)
            if refused is not None:
                return refused
            if isinstance(exc, httpcore.RemoteProtocolError) and url.startswith("https:"):
                return Outcome(
                    "transient",
                    "connection failed: the server closed it without answering "
                    "(under TLS 1.3 this is also how a refused client certificate shows)",
                )
            return Outcome("transient", f"connection failed: {type(exc).__name__}")
        if response.status_code == 429 or response.status_code >= 500:
            return Outcome("transient", f"HTTP {response.status_code}", response.retry_after())
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
            return Outcome("transient", "receiver answered transient-error", response.retry_after())
        return Outcome("permanent", f"receiver answered {code}")

    def close(self) -> None:
        self.pool.close()


_ACCEPT = FHIR_JSON.encode("ascii")
# what httpx reports as a TransportError (its TimeoutException caught first), as httpcore raises it: the
# same class names (httpx maps each httpcore error to its namesake), with the cause (an SSL error...) chained
_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError, httpcore.UnsupportedProtocol)


def _diagnostics(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        return str(data["issue"][0].get("diagnostics", ""))[:200]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
