"""The one place that runs the stages in order (see the README's pipeline picture).

``gateway translate``: ingest → translate → label → validate.
``gateway dispatch``: the same, then for each routed recipient consent → redact → package (and the
audit of every decision).  Sealing and delivery join here with the delivery issue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway import audit, ingest, invariants, label, package, redact, validate
from gateway.consent import ConsentStore, Decision, decide
from gateway.directory import Directory
from gateway.errors import ProfileViolation, Where
from gateway.mappings import Mappings
from gateway.model import Issue
from gateway.policy import policy_from
from gateway.redact import View
from gateway.route import Routing, route
from gateway.settings import Settings
from gateway.translate import Translation, translate
from gateway.translate.ids import resource_id, urn

__all__ = ["Dispatch", "Result", "dispatch_letter", "translate_letter"]


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
        # the R4B verdict on the hot path; the stricter FHIR JSON rules hold by construction and are
        # checked on every output by the tests (and here with --strict)
        validate.check(resource, fhir_json=settings.strict_validation)
        if settings.strict_validation:
            problems = validate.check_with_models(resource)
            if problems:
                raise ProfileViolation(
                    f"{resource['resourceType']}/{resource['id']} is not valid FHIR R4: {problems[0]}",
                    where=Where(path=resource["resourceType"]),
                )
    letter = translation.letter
    if settings.strict_validation:
        broken = invariants.violations({"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]})
        if broken:
            raise ProfileViolation(f"translation breaks {broken[0]}")
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


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Everything a dispatch produced: one message per recipient, the audit, and the routing report."""

    messages: dict[str, dict[str, Any]]  # recipient id -> message Bundle
    audit: dict[str, Any]
    routing: Routing
    decisions: dict[str, Decision]
    views: dict[str, View]
    translation: Result

    @property
    def complete(self) -> bool:
        """False when a routing exception (no GP, unknown or unreachable actor) was met."""
        return not self.routing.exceptions


def dispatch_letter(
    raw: bytes,
    *,
    name: str,
    mappings: Mappings,
    settings: Settings,
    directory: Directory,
    consents: ConsentStore,
    prior: Sequence[tuple[bytes, str]] = (),
    at: datetime | None = None,
    fallback: str | None = None,
    cutter: Callable[..., View] = redact.cut,
) -> Dispatch:
    """Translate, label, route, decide, redact and package one letter for every recipient (no network).

    ``cutter`` is the redaction stage; tests inject a broken one to prove the leak checks can fail.
    """
    when = at or datetime.now(UTC)
    result = translate_letter(raw, name=name, mappings=mappings, settings=settings, prior=prior, now=when)
    resources = [e["resource"] for e in result.bundle["entry"]]
    policy = policy_from(mappings)
    rules = label.rules_from(mappings)
    scanner = redact.scanner_from(mappings).with_drugs(resources)
    letter = result.translation.letter
    letter_key = f"{letter.doc_id.system}|{letter.doc_id.value}"
    recorded = when.isoformat(timespec="seconds")
    patient_ids = {(i.system, i.value) for i in letter.patient.ids}
    related = [r for r in resources if r["resourceType"] == "RelatedPerson"]
    routing = route(resources, directory, policy, fallback)
    messages: dict[str, dict[str, Any]] = {}
    decisions: dict[str, Decision] = {}
    views: dict[str, View] = {}
    events: list[dict[str, Any]] = []
    for index, event in enumerate(routing.events):
        events.append(audit.route_event(event, letter.patient.ids[0], letter_key, recorded, index))
    for routed in routing.routed:
        decision = decide(patient_ids, routed.recipient, when, consents, policy, related=related)
        view = cutter(resources, decision, routed, rules, scanner)
        message = None
        if decision.categories and view.communication is not None:
            message = package.message(
                view, letter_key, recorded, package.Sender(endpoint=settings.public_url), rules.system
            )
            header = message["entry"][0]["resource"]
            validate.check(header, fhir_json=True)
            if settings.strict_validation:
                broken = invariants.violations(message)
                if broken:
                    raise ProfileViolation(f"message for {routed.recipient.id} breaks {broken[0]}")
            for res in view.resources:
                if res["id"] in view.changed and res["id"] not in view.checked:
                    validate.check(res, fhir_json=True)
            messages[routed.recipient.id] = message
        decisions[routed.recipient.id] = decision
        views[routed.recipient.id] = view
        events.append(
            audit.disclosure_event(view, decision, letter.patient.ids[0], letter_key, recorded, message, routed.reasons)
        )
    return Dispatch(messages, audit.audit_bundle(events, letter_key, recorded), routing, decisions, views, result)
