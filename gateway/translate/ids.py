"""Deterministic resource ids: the same letter always gives the same ids (golden tests, replays).

An id is a UUID v5 over the resource type and a key built from source identifiers (document id,
INS, RPPS, FINESS) or, for things without an identifier, the document id plus a position.
"""

from __future__ import annotations

import hashlib
import uuid

__all__ = ["NAMESPACE", "resource_id", "urn"]

NAMESPACE = uuid.UUID("6f1c3a0e-5b7d-4c52-9a57-2f0f8d1c9e41")


_NS = NAMESPACE.bytes


def resource_id(resource_type: str, *key: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, "type|key..."))``, computed without the uuid module's overhead."""
    h = hashlib.sha1(_NS + "|".join((resource_type, *key)).encode("utf-8")).hexdigest()
    # version 5 (the 13th hex digit) and the RFC 4122 variant (the top bits of the 17th: 10xx)
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def urn(resource_id_: str) -> str:
    return f"urn:uuid:{resource_id_}"
