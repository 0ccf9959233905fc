"""FHIR REST transport: ``POST {endpoint}/$process-message`` with httpx.

The response decides: HTTP 200 with a response message whose ``MessageHeader.response.code`` is
``ok`` → acknowledged; ``transient-error``, 429, 5xx, timeouts and connection failures → retry
(``Retry-After`` honoured); ``fatal-error`` and other 4xx → permanent.  Mutual TLS is configured on
the client (certificate, key, CA) when the settings give them.
"""

from __future__ import annotations

import httpx
import orjson

from gateway.transports.base import Outcome

__all__ = ["HttpTransport"]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: let the backoff decide


class HttpTransport:
    def __init__(self, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        self.client = client or httpx.Client(timeout=timeout)

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        url = endpoint.rstrip("/") + "/$process-message"
        try:
            response = self.client.post(url, content=payload, headers={"Content-Type": "application/fhir+json"})
        except httpx.TimeoutException:
            return Outcome("transient", "timeout")
        except httpx.TransportError as exc:
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
        self.client.close()


def _diagnostics(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        return str(data["issue"][0].get("diagnostics", ""))[:200]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
