"""Stage — report: read the audit log back as exchanges — per letter, per recipient, what was sent,
what was withheld and why, which consent decided, and the delivery timeline.

The audit page, the patient report ("who received what about me, when, and what was held back":
the GDPR data-subject access request) and ``GET /Patient/$audit-report`` are all built from this one
reading of the AuditEvents, so they cannot disagree.  Only identifiers and the gateway's own reasons
appear; clinical content was never in the log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.auditlog import AuditLog, Filters, Record

__all__ = [
    "Exchange",
    "Item",
    "RecipientView",
    "Step",
    "exchanges",
    "for_letter",
    "for_patient",
    "patient_report_bundle",
]

Json = dict[str, Any]
_CONSENT_TYPE = "Consent"


@dataclass(frozen=True, slots=True)
class Item:
    """One element sent or withheld (named by type/id, never by content)."""

    what: str
    category: str = ""
    rule: str = ""
    reason: str = ""
    consent: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    """One moment of a delivery: decided, attempted, sent, acknowledged, refused..."""

    seq: int
    at: str
    kind: str
    outcome: str
    text: str


@dataclass(slots=True)
class RecipientView:
    recipient: str
    display: str = ""
    decided_at: str = ""
    sent: list[Item] = field(default_factory=list)
    withheld: list[Item] = field(default_factory=list)
    consents: list[str] = field(default_factory=list)
    summary: str = ""
    timeline: list[Step] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return any(s.kind == "disclose" and s.outcome == "0" for s in self.timeline) and bool(self.sent)


@dataclass(slots=True)
class Exchange:
    letter_id: str
    patient: str = ""
    first_at: str = ""
    recipients: dict[str, RecipientView] = field(default_factory=dict)
    other: list[Step] = field(default_factory=list)  # routing exceptions, operations without a recipient


def _display(event: Json) -> str:
    for agent in event.get("agent") or ():
        if any(c.get("code") == "110152" for c in (agent.get("type") or {}).get("coding", ())):
            return str((agent.get("who") or {}).get("display") or "")
    return ""


def _details(entity: Json) -> dict[str, str]:
    return {str(d.get("type")): str(d.get("valueString", "")) for d in entity.get("detail") or ()}


def _label(entity: Json) -> str:
    labels = entity.get("securityLabel") or ()
    return str(labels[0].get("code", "")) if labels else ""


def _apply(view: RecipientView, record: Record, event: Json) -> None:
    """A disclosure decision: the latest one says what this recipient was (or would be) sent."""
    view.display = _display(event) or view.display
    view.decided_at = record.at
    view.summary = str(event.get("outcomeDesc", ""))
    view.sent, view.withheld, view.consents = [], [], []
    for entity in event.get("entity") or ():
        description = str(entity.get("description", ""))
        what = entity.get("what") or {}
        name = str(what.get("display") or what.get("reference") or "")
        if description == "sent":
            view.sent.append(Item(name, _label(entity)))
        elif description.startswith("withheld"):
            details = _details(entity)
            view.withheld.append(
                Item(name, _label(entity) or description[10:-1], details.get("rule", ""), details.get("reason", ""),
                     details.get("consent", ""))
            )  # fmt: skip
        elif (entity.get("type") or {}).get("code") == _CONSENT_TYPE and description == "consent version that decided":
            view.consents.append(str(what.get("reference", "")))


def exchanges(records: list[Record]) -> list[Exchange]:
    """Group records (oldest first) by letter, then by recipient."""
    found: dict[str, Exchange] = {}
    for record in records:
        key = record.letter_id or "(no letter)"
        exchange = found.get(key)
        if exchange is None:
            exchange = found[key] = Exchange(key, record.patient or "", record.at)
        exchange.patient = exchange.patient or record.patient or ""
        event = record.event
        step = Step(record.seq, record.at, record.kind or "", record.outcome or "", str(event.get("outcomeDesc", "")))
        if record.recipient:
            view = exchange.recipients.setdefault(record.recipient, RecipientView(record.recipient))
            if record.kind == "disclose" and event.get("type", {}).get("code") == "110106" and _has_patient(event):
                _apply(view, record, event)
            view.timeline.append(step)
        else:
            exchange.other.append(step)
    return list(found.values())


def _has_patient(event: Json) -> bool:
    return any((e.get("role") or {}).get("code") == "1" for e in event.get("entity") or ())


def for_letter(log: AuditLog, letter_id: str) -> Exchange | None:
    found = exchanges(list(log.iterate(Filters(letter=letter_id))))
    return found[0] if found else None


def for_patient(log: AuditLog, patient: str) -> list[Exchange]:
    return [e for e in exchanges(list(log.iterate(Filters(patient=patient)))) if e.letter_id != "(no letter)"]


def patient_report_bundle(patient: str, found: list[Exchange], generated: str) -> Json:
    """The data-subject access report as FHIR: a List (one item per recipient and letter, with a
    readable summary) followed by the AuditEvents it rests on (by reference to the audit API)."""
    rows = []
    entries = []
    for exchange in found:
        for view in exchange.recipients.values():
            flag = "reçu" if view.sent else "rien reçu"
            rows.append(
                f"<tr><td>{_esc(view.decided_at)}</td><td>{_esc(view.display or view.recipient)}</td>"
                f"<td>{flag}: {len(view.sent)} élément(s)</td><td>{len(view.withheld)} retenu(s)</td>"
                f"<td>{_esc(', '.join(view.consents) or '—')}</td></tr>"
            )
            entries.append(
                {
                    "item": {"display": f"lettre {exchange.letter_id} → {view.display or view.recipient}"},
                    "date": _fhir_instant(view.decided_at or exchange.first_at),
                    "flag": {"text": f"{len(view.sent)} sent, {len(view.withheld)} withheld"},
                }
            )
    system, _sep, value = patient.rpartition("|")
    table = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>Qui a reçu quoi à mon sujet, quand, et ce qui a été retenu.</p>'
        "<table><tr><th>Quand</th><th>Destinataire</th><th>Envoyé</th><th>Retenu</th><th>Consentement</th></tr>"
        + "".join(rows)
        + "</table></div>"
    )
    identifier: Json = {"system": system, "value": value} if system else {"value": value}
    listing: Json = {
        "resourceType": "List",
        "id": "audit-report",
        "text": {"status": "generated", "div": table},
        "status": "current",
        "mode": "snapshot",
        "title": "Disclosures about the patient (GDPR art. 15 access report)",
        "subject": {"identifier": identifier},
        "date": generated,
    }
    if entries:
        listing["entry"] = entries
    else:
        empty = {"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown"}
        listing["emptyReason"] = {"coding": [empty]}
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": generated,
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": listing}],
    }


def _fhir_instant(stamp: str) -> str:
    """``2026-11-02T09:00:00.000000Z`` → FHIR dateTime (milliseconds)."""
    return stamp[:23] + "Z" if len(stamp) >= 23 else stamp


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
