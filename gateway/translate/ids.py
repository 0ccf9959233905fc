"""Deterministic resource ids: the same letter always gives the same ids (golden tests, replays).

An id is a UUID v5 over the resource type and a key built from source identifiers (document id,
INS, RPPS, FINESS) or, for things without an identifier, the document id plus a position.
"""

from __future__ import annotations

import uuid

__all__ = ["NAMESPACE", "resource_id", "urn"]

NAMESPACE = uuid.UUID("6f1c3a0e-5b7d-4c52-9a57-2f0f8d1c9e41")


def resource_id(resource_type: str, *key: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join((resource_type, *key))))


def urn(resource_id_: str) -> str:
    return f"urn:uuid:{resource_id_}"
