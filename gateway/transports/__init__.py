"""Transports: how a sealed message reaches a recipient's endpoint.

A transport is one call — ``send(payload, endpoint) -> Outcome`` — and the scheme of the endpoint
address picks it (``https:``/``http:`` → FHIR ``$process-message``; ``mailto:`` → MSSanté SMTP).  Outcomes are classified here, retries are decided by :mod:`gateway.deliver`.
"""

from __future__ import annotations

from gateway.transports.base import Outcome, Transport, UnsupportedTransport, transport_for

__all__ = ["Outcome", "Transport", "UnsupportedTransport", "transport_for"]
