"""Strict JSON parsing for FHIR inputs (orjson: rejects invalid UTF-8, NaN and duplicate nothing)."""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.errors import EncodingError, IngestError, Where

__all__ = ["parse_json"]

_POSITION = re.compile(r"line (\d+) column (\d+)")


def parse_json(raw: bytes, name: str) -> dict[str, Any]:
    """Parse a FHIR JSON resource; the top level must be an object with a ``resourceType``."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        found = _POSITION.search(str(exc))
        where = (
            Where(source=name, line=int(found.group(1)), column=int(found.group(2))) if found else Where(source=name)
        )
        text = str(exc)
        if "utf-8" in text.lower() or "surrogate" in text.lower():
            raise EncodingError(f"invalid UTF-8 in JSON: {text}", where=where) from None
        raise IngestError(f"malformed JSON: {text}", where=where) from None
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise IngestError("JSON input is not a FHIR resource (no resourceType)", where=Where(source=name))
    return data
