"""The one place that runs the stages in order (see the README's pipeline picture).

Today: ingest → translate → label → validate → serialise, for ``gateway translate``.  Routing,
consent, redaction, packaging, sealing and delivery join here as they are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway import ingest, label, validate
from gateway.errors import ProfileViolation, Where
from gateway.mappings import Mappings
from gateway.model import Issue
from gateway.settings import Settings
from gateway.translate import Translation, translate
from gateway.translate.ids import resource_id, urn

__all__ = ["Result", "translate_letter"]


@dataclass(frozen=True, slots=True)
class Result:
    bundle: dict[str, Any]
    translation: Translation
    issues: tuple[Issue, ...]

    def json(self) -> bytes:
        return orjson.dumps(self.bundle, option=orjson.OPT_INDENT_2)


def translate_letter(
    raw: bytes,
    *,
    name: str,
    mappings: Mappings,
    settings: Settings,
    prior: Sequence[tuple[bytes, str]] = (),
    now: datetime | None = None,
) -> Result:
    """Translate one letter (and its optional prior lists) into one labelled, validated collection Bundle."""
    recorded = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    doc = ingest.read(raw, name=name, mappings=mappings, max_bytes=settings.max_document_bytes)
    priors = [
        ingest.read(data, name=prior_name, mappings=mappings, role="prior", max_bytes=settings.max_document_bytes)
        for data, prior_name in prior
    ]
    translation = translate(doc, mappings, prior=priors, zone=settings.default_timezone, recorded=recorded)
    resources = translation.resources
    label.apply(resources, label.rules_from(mappings), translation.letter.confidentiality)
    for resource in resources:
        validate.check(resource, fhir_json=True)
        if settings.strict_validation:
            problems = validate.check_with_models(resource)
            if problems:
                raise ProfileViolation(
                    f"{resource['resourceType']}/{resource['id']} is not valid FHIR R4: {problems[0]}",
                    where=Where(path=resource["resourceType"]),
                )
    letter = translation.letter
    bundle = {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", letter.doc_id.system, letter.doc_id.value, "translation"),
        "meta": {"lastUpdated": recorded},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": urn(resource_id("Bundle", letter.doc_id.value))},
        "type": "collection",
        "timestamp": recorded,
        "entry": [{"fullUrl": urn(r["id"]), "resource": r} for r in resources],
    }
    return Result(bundle, translation, translation.issues)
