"""The transport protocol and the outcome of one delivery attempt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypeGuard

__all__ = [
    "FHIR_JSON",
    "MediaTypeTransport",
    "Outcome",
    "Transport",
    "UnsupportedTransport",
    "carries",
    "transport_for",
]

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True, slots=True)
class Outcome:
    """``ok``: acknowledged; ``sent``: handed to a store-and-forward relay, the acknowledgement comes later
    (an MDN); ``transient``: try again later; ``permanent``: resending unchanged is useless."""

    kind: Literal["ok", "sent", "transient", "permanent"]
    detail: str
    retry_after: float | None = None  # seconds the receiver asked us to wait


class Transport(Protocol):
    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome: ...

    def close(self) -> None: ...


class MediaTypeTransport(Transport, Protocol):
    """A transport that can carry payloads other than FHIR JSON (e.g. a JWE, ``application/jose``) and
    says which in ``media_types``; a plain :class:`Transport` carries FHIR JSON only."""

    media_types: frozenset[str]

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = FHIR_JSON) -> Outcome: ...


def carries(transport: Transport, media_type: str) -> TypeGuard[MediaTypeTransport]:
    """Whether ``transport`` declares it can send a payload of ``media_type``."""
    return media_type in getattr(transport, "media_types", frozenset())


class UnsupportedTransport:
    """For endpoints no transport serves yet: a permanent, explained refusal (never a silent drop)."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        return Outcome("permanent", f"no transport for {self.scheme!r} endpoints in this version")

    def close(self) -> None:
        return None


def transport_for(endpoint: str, transports: dict[str, Transport]) -> Transport:
    scheme = endpoint.split(":", 1)[0].lower()
    return transports.get(scheme) or UnsupportedTransport(scheme)
