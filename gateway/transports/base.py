"""The transport protocol and the outcome of one delivery attempt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Outcome", "Transport", "UnsupportedTransport", "transport_for"]


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
