"""The one place that runs the stages in order (see the README's pipeline picture).

``gateway translate``: ingest → translate → label → validate.
``gateway dispatch``: the same, then for each routed recipient consent → redact → package (and the
audit of every decision).  The service (:mod:`gateway.deliver`) calls :func:`cut_for` per delivery at
send time, then seals and sends.
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
from gateway.model import Ident, Issue
from gateway.policy import Policy, policy_from
from gateway.redact import View
from gateway.route import Routed, Routing, route
from gateway.settings import Settings
from gateway.translate import Translation, translate
from gateway.translate.ids import resource_id, urn

__all__ = ["Cut", "Dispatch", "Prepared", "Result", "cut_for", "dispatch_letter", "prepare", "translate_letter"]


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A translated, labelled letter ready to be cut for any recipient (shared, never mutated)."""

    result: Result
    resources: list[dict[str, Any]]
    letter_key: str
    patient_ids: frozenset[tuple[str, str]]
    related: list[dict[str, Any]]
    scanner: redact.MedicalScanner
    rules: label.LabelRules
    policy: Policy

    @property
    def patient(self) -> Ident:
        return self.result.translation.letter.patient.ids[0]


@dataclass(frozen=True, slots=True)
class Cut:
    """One recipient's decision, view and message (None: nothing may be sent), and its audit event."""

    decision: Decision
    view: View
    message: dict[str, Any] | None
    event: dict[str, Any]


def prepare(
    raw: bytes,
    *,
    name: str,
    mappings: Mappings,
    settings: Settings,
    prior: Sequence[tuple[bytes, str]] = (),
    now: datetime | None = None,
) -> Prepared:
    """ingest → translate → label → validate, plus what every recipient's cut needs."""
    result = translate_letter(raw, name=name, mappings=mappings, settings=settings, prior=prior, now=now)
    resources = [e["resource"] for e in result.bundle["entry"]]
    letter = result.translation.letter
    return Prepared(
        result,
        resources,
        f"{letter.doc_id.system}|{letter.doc_id.value}",
        frozenset((i.system, i.value) for i in letter.patient.ids),
        [r for r in resources if r["resourceType"] == "RelatedPerson"],
        redact.scanner_from(mappings).with_drugs(resources),
        label.rules_from(mappings),
        policy_from(mappings),
    )


def cut_for(
    prepared: Prepared,
    routed: Routed,
    at: datetime,
    consents: ConsentStore,
    settings: Settings,
    cutter: Callable[..., View] = redact.cut,
    replaces: str | None = None,
) -> Cut:
    """consent → redact → package for one recipient, at send time, with its audit event.

    ``replaces``: the earlier message (same recipient, earlier version of the letter) this one supersedes.
    """
    recorded = at.isoformat(timespec="seconds")
    decision = decide(prepared.patient_ids, routed.recipient, at, consents, prepared.policy, related=prepared.related)
    view = cutter(prepared.resources, decision, routed, prepared.rules, prepared.scanner)
    message = None
    if decision.categories and view.communication is not None:
        message = package.message(
            view,
            prepared.letter_key,
            recorded,
            package.Sender(endpoint=settings.public_url),
            prepared.rules.system,
            replaces,
        )
        validate.check(message["entry"][0]["resource"], fhir_json=True)
        if settings.strict_validation:
            broken = invariants.violations(message)
            if broken:
                raise ProfileViolation(f"message for {routed.recipient.id} breaks {broken[0]}")
        for res in view.resources:
            if res["id"] in view.changed and res["id"] not in view.checked:
                validate.check(res, fhir_json=True)
    event = audit.disclosure_event(
        view, decision, prepared.patient, prepared.letter_key, recorded, message, routed.reasons
    )
    return Cut(decision, view, message, event)


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
    prepared = prepare(raw, name=name, mappings=mappings, settings=settings, prior=prior, now=when)
    recorded = when.isoformat(timespec="seconds")
    routing = route(prepared.resources, directory, prepared.policy, fallback)
    events = [
        audit.route_event(event, prepared.patient, prepared.letter_key, recorded, index)
        for index, event in enumerate(routing.events)
    ]
    messages: dict[str, dict[str, Any]] = {}
    decisions: dict[str, Decision] = {}
    views: dict[str, View] = {}
    for routed in routing.routed:
        cut = cut_for(prepared, routed, when, consents, settings, cutter)
        if cut.message is not None:
            messages[routed.recipient.id] = cut.message
        decisions[routed.recipient.id] = cut.decision
        views[routed.recipient.id] = cut.view
        events.append(cut.event)
    return Dispatch(
        messages, audit.audit_bundle(events, prepared.letter_key, recorded), routing, decisions, views, prepared.result
    )
