"""What each operation answers and takes, declared in the OpenAPI so that a client generator — and
schemathesis in the tests — can check every answer, not only the refusals.

The handlers return ``Response`` objects (FHIR JSON serialised once, by orjson), so FastAPI cannot see
their shapes: they are declared here, by path, and merged into the document by
:func:`gateway.api.outcomes.install`.  A FHIR resource is declared by its ``resourceType`` (the
resources themselves are validated against the FHIR models where they are built, not here).
"""

from __future__ import annotations

from typing import Any

from gateway.outbox import STATES
from gateway.store import STORED_TYPES

__all__ = ["ANSWERS", "REQUESTS", "SCHEMAS"]

FHIR_JSON = "application/fhir+json"
Json = dict[str, Any]


def _resource(*types: str) -> Json:
    kind: Json = {"type": "string", "enum": list(types)} if types else {"type": "string", "minLength": 1}
    return {"type": "object", "required": ["resourceType"], "properties": {"resourceType": kind}}


def _bundle(bundle_type: str) -> Json:
    return {
        "type": "object",
        "required": ["resourceType", "type"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Bundle"]},
            "type": {"type": "string", "enum": [bundle_type]},
            "entry": {"type": "array", "items": {"type": "object"}},
        },
    }


_TIME = {"type": ["string", "null"]}
SCHEMAS: dict[str, Json] = {
    "LetterAccepted": {
        "type": "object",
        "required": ["letterId", "status", "duplicate", "recipients", "routingExceptions"],
        "properties": {
            "letterId": {"type": "string"},
            "status": {"type": "string", "description": "the status URL, /letters/{letterId}"},
            "duplicate": {"type": "boolean"},
            "recipients": {"type": "integer", "minimum": 0},
            "routingExceptions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Delivery": {
        "type": "object",
        "required": ["recipient", "messageHeader", "letter", "status", "attempts"],
        "properties": {
            "recipient": {"type": "string"},
            "messageHeader": {"type": "string"},
            "letter": {"type": "string"},
            "endpoint": {"type": "string"},
            "status": {"type": "string", "enum": list(STATES)},
            "attempts": {"type": "integer", "minimum": 0},
            "updated": {"type": "string"},
            "queued": _TIME,
            "sent": _TIME,
            "acknowledged": _TIME,
            "nextAttempt": _TIME,
            "lastError": {"type": ["string", "null"]},
            "replaces": {"type": ["string", "null"]},
            "kind": {
                "type": "string",
                "enum": ["letter", "withdrawal"],
                "description": "the letter, or a notice to set an earlier version aside (`replaces`)",
            },
        },
    },
    "LetterStatus": {
        "type": "object",
        "required": ["deliveries"],
        "properties": {"deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}}},
    },
    "Replayed": {
        "type": "object",
        "required": ["messageHeader", "status"],
        "properties": {"messageHeader": {"type": "string"}, "status": {"type": "string", "enum": ["queued"]}},
    },
    "StoredResource": _resource(*sorted(STORED_TYPES)),
    "SearchSet": _bundle("searchset"),
    "History": _bundle("history"),
    "Collection": _bundle("collection"),
}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _fhir(schema: Json, description: str) -> Json:
    return {"description": description, "content": {FHIR_JSON: {"schema": schema}}}


_ACCEPTED = _fhir(_ref("LetterAccepted"), "Stored (202), or the same letter again (200): its id and status URL")
# (method, path) -> {status: response object}
ANSWERS: dict[tuple[str, str], dict[str, Json]] = {
    ("post", "/letters"): {"202": _ACCEPTED, "200": _ACCEPTED},
    ("post", "/$process-message"): {
        "202": _ACCEPTED,
        "200": _fhir(
            {"anyOf": [_ref("LetterAccepted"), _resource("OperationOutcome")]},
            "A letter already stored, or an acknowledgement applied (OperationOutcome)",
        ),
    },
    ("get", "/deliveries"): {
        "200": {
            **_fhir({"type": "array", "items": _ref("Delivery")}, "A page of deliveries, oldest change first"),
            "headers": {
                "Link": {
                    "description": 'the next page (`<url>; rel="next"`), absent on the last one',
                    "schema": {"type": "string"},
                }
            },
        }
    },
    ("post", "/deliveries/{message_id}/$replay"): {"200": _fhir(_ref("Replayed"), "Back in the queue")},
    ("get", "/letters/{letter_id}"): {"200": _fhir(_ref("LetterStatus"), "Each recipient's delivery state")},
    ("get", "/AuditEvent"): {"200": _fhir(_ref("SearchSet"), "A page of AuditEvents")},
    ("get", "/AuditEvent/$export"): {
        "200": {
            "description": "Every matching AuditEvent (CSV, or one JSON per line)",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
    ("get", "/Patient/$audit-report"): {
        "200": _fhir(_ref("Collection"), "The data-subject access report: a collection Bundle holding one List")
    },
    ("post", "/{resource_type}"): {"201": _fhir(_ref("StoredResource"), "Created (version 1)")},
    ("get", "/{resource_type}"): {"200": _fhir(_ref("SearchSet"), "Search results")},
    ("put", "/{resource_type}/{rid}"): {
        "200": _fhir(_ref("StoredResource"), "Updated (a new version)"),
        "201": _fhir(_ref("StoredResource"), "Created"),
    },
    ("get", "/{resource_type}/{rid}"): {"200": _fhir(_ref("StoredResource"), "The current version")},
    ("get", "/{resource_type}/{rid}/_history"): {"200": _fhir(_ref("History"), "Every version")},
    ("get", "/{resource_type}/{rid}/_history/{version}"): {"200": _fhir(_ref("StoredResource"), "That version")},
}

_FHIR_BODY = {FHIR_JSON: {"schema": _resource()}}
REQUESTS: dict[tuple[str, str], Json] = {
    ("post", "/letters"): {
        "required": True,
        "content": {
            "application/hl7-cda+xml": {"schema": {"type": "string"}},
            FHIR_JSON: {"schema": _resource("Bundle")},
        },
    },
    ("post", "/$process-message"): {"required": True, "content": {FHIR_JSON: {"schema": _resource("Bundle")}}},
    ("post", "/{resource_type}"): {"required": True, "content": _FHIR_BODY},
    ("put", "/{resource_type}/{rid}"): {"required": True, "content": _FHIR_BODY},
}
