"""Audit records (FHIR R4 AuditEvent, after IHE BALP) for every routing and disclosure decision.

One ``PrivacyDisclosure``-style event per recipient (DICOM 110106 Export, ISO 21089 *disclose*): who
received it, under which rule or Consent versions, every resource sent and every element withheld
with the reason; and one event per routing exception (no médecin traitant, actor not in the
directory, actor without endpoint, fallback used).  Events carry identifiers and references only, no
clinical text: the withheld items are named by type and id, never by content.

This module only builds the events, as values; :mod:`gateway.auditlog` chains and stores them.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

from gateway.consent import Decision
from gateway.model import Ident
from gateway.redact import View, Withheld
from gateway.route import RouteEvent
from gateway.translate import narrative as nv
from gateway.translate.build import PROJECT
from gateway.translate.ids import resource_id, urn

__all__ = ["audit_bundle", "authentication_event", "disclosure_event", "rest_event", "route_event"]

Json = dict[str, Any]
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
CATEGORY_SYSTEM = f"{PROJECT}/CodeSystem/data-category"
OBSERVER = {"display": "discharge-gateway"}


def _patient_entity(patient: Ident) -> Json:
    return {
        "what": {"identifier": {"system": patient.system, "value": patient.value}},
        "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
    }


def _agents(recipient_ref: str | None, display: str, policy: Sequence[str] = ()) -> list[Json]:
    """The gateway as source, and the recipient with the Consent versions that decided (``policy``)."""
    source = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": OBSERVER,
        "requestor": False,
    }
    recipient: Json = {
        "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
        "who": {"reference": recipient_ref, "display": display} if recipient_ref else {"display": display},
        "requestor": False,
    }
    if policy:
        recipient["policy"] = list(policy)
    return [source, recipient]


def _withheld_entity(item: Withheld) -> Json:
    details = [{"type": "rule", "valueString": item.rule}, {"type": "reason", "valueString": item.reason}]
    if item.consent:
        details.append({"type": "consent", "valueString": item.consent})
    entity: Json = {
        "what": {"display": item.what},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "description": f"withheld ({item.category})",
        "detail": details,
    }
    if item.category in ("medical", "social", "logistics"):
        entity["securityLabel"] = [{"system": CATEGORY_SYSTEM, "code": item.category}]
    return entity


def disclosure_event(
    view: View,
    decision: Decision,
    patient: Ident,
    letter_key: str,
    recorded: str,
    message: Json | None,
    reasons: Sequence[str],
) -> Json:
    """What one recipient was sent, what it was not, and which rule or Consent version decided."""
    recipient = view.recipient
    decided = decision.consents  # computed by the property at each use: once here
    sent: list[Json] = []
    if message is not None:
        entries = message["entry"]
        sent.append(
            {
                "what": {"reference": urn(message["id"]), "display": "message Bundle"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "description": f"message {entries[0]['resource']['id']} (MessageHeader.id)",
            }
        )
        for entry in islice(entries, 1, None):
            res = entry["resource"]
            item: Json = {
                "what": {"reference": entry["fullUrl"], "display": f"{res['resourceType']}/{res['id']}"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "description": "sent",
            }
            meta = res.get("meta")
            security = meta.get("security") if meta else None
            if security:
                labels = [s for s in security if s.get("system") == CATEGORY_SYSTEM]
                if labels:
                    item["securityLabel"] = labels
            sent.append(item)
    consents = [
        {
            "what": {"reference": ref},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent"},
            "description": "consent version that decided",
        }
        for ref in decided
    ]
    ignored = [
        {
            "what": {"reference": b.consent} if b.consent else {"display": b.rule},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent"},
            "description": f"consent not applied: {b.text}",
        }
        for b in decision.ignored
    ]
    allowed = ", ".join(sorted(decision.categories)) or "rien"
    bases = "; ".join(
        f"{c}: {b.rule}" + (f" ({b.consent})" if b.consent else "") for c, b in sorted(decision.by_category.items())
    )
    outcome_desc = (
        f"{'sent' if message is not None else 'nothing sent'} to {recipient.display} ({decision.kind or 'kind unknown'}, "
        f"{'care team' if decision.care_team else 'outside the care team'}); allowed: {allowed}; "
        f"{len(view.withheld)} item(s) withheld; basis — {bases}"
    )
    event: Json = {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", letter_key, recipient.id, "disclosure", recorded),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(
            nv.dl(
                [
                    ("Destinataire", recipient.display),
                    ("Motif d'envoi", ", ".join(reasons)),
                    ("Autorisé", allowed),
                    ("Retenu", f"{len(view.withheld)} élément(s)"),
                ]
            ),
        ),  # the withheld items, each with its rule and Consent, are the entities below (not repeated here)
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "subtype": [{"system": LIFECYCLE, "code": "disclose", "display": "Disclose"}],
        "action": "R",
        "recorded": recorded,
        "outcome": "0",
        "outcomeDesc": outcome_desc,
        "purposeOfEvent": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "COC"}]}
        ],
        "agent": _agents(recipient.ref, recipient.display, decided),
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [_patient_entity(patient), *consents, *ignored, *sent, *[_withheld_entity(w) for w in view.withheld]],
    }
    return event


def route_event(event: RouteEvent, patient: Ident, letter_key: str, recorded: str, index: int) -> Json:
    """A routing exception: never a silent success."""
    outcome = "0" if event.kind in ("fallback", "not-routed") else "4"
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", letter_key, "route", event.kind, str(index), recorded),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(f"Routage — {event.kind} : {event.text}")),
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "subtype": [
            {"system": LIFECYCLE, "code": "disclose", "display": "Disclose"},
            {"system": f"{PROJECT}/CodeSystem/route-event", "code": event.kind},
        ],
        "action": "R",
        "recorded": recorded,
        "outcome": outcome,
        "outcomeDesc": event.text,
        "agent": _agents(None, event.recipient or "destinataire non résolu"),
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [_patient_entity(patient)],
    }


def audit_bundle(events: Iterable[Json], letter_key: str, recorded: str) -> Json:
    items = list(events)
    return {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", letter_key, "audit", recorded),
        "type": "collection",
        "timestamp": recorded,
        "entry": [{"fullUrl": urn(e["id"]), "resource": e} for e in items],
    }


def refusal_event(issue_code: str, text: str, client: str, recorded: str) -> Json:
    """A letter refused at the door (malformed, unsafe, unknown...): audited, with no content kept."""
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", "refusal", client, recorded, text),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(f"Lettre refusée : {text}")),
        "type": {"system": DCM, "code": "110107", "display": "Import"},
        "subtype": [{"system": LIFECYCLE, "code": "receive", "display": "Receive"}],
        "action": "C",
        "recorded": recorded,
        "outcome": "4",
        "outcomeDesc": f"refused ({issue_code}): {text}",
        "agent": [
            {
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {"display": client},
                "requestor": True,
            },
        ],
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }


def operation_event(
    what: str, text: str, who: str, recorded: str, *, outcome: str = "0", subtype: str = "transmit"
) -> Json:
    """An operation on a delivery outside the worker's attempts: a replay by an operator, an
    asynchronous acknowledgement.  ``what`` names the message (``MessageHeader/<id>``); no content."""
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", "operation", what, who, recorded, text),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(text)),
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "subtype": [{"system": LIFECYCLE, "code": subtype, "display": subtype.capitalize()}],
        "action": "E",
        "recorded": recorded,
        "outcome": outcome,
        "outcomeDesc": text,
        "agent": [
            {
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {"display": who},
                "requestor": True,
            },
        ],
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {"what": {"reference": what}, "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}}
        ],
    }


def erasure_event(letter_id: str, recorded: str, retention: str) -> Json:
    """A letter's content erased at the end of its retention period (``retention``: how long, as said
    to the reader); what the letter was and where it went stays in the trail, its content does not."""
    text = f"letter content erased: kept {retention}, every delivery final"
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", "erasure", letter_id, recorded),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(text)),
        "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": LIFECYCLE, "code": "destroy", "display": "Destroy"}],
        "action": "D",
        "recorded": recorded,
        "outcome": "0",
        "outcomeDesc": text,
        "agent": [_requestor("discharge-gateway")],
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "what": {"reference": f"Letter/{letter_id}"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            }
        ],
    }


def acknowledgement_event(
    message_id: str, ok: bool, detail: str, recipient: str, recorded: str, *, event: str | None = None
) -> Json:
    """An acknowledgement that came after the hand-over (an MSSanté MDN): the disclosure's real outcome;
    ``event="unacknowledged"`` when none came in time (the gateway gave up waiting)."""
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", message_id, "acknowledgement", recorded, detail),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(
            nv.para(
                f"Aucun accusé de {recipient} — {detail}"
                if event == "unacknowledged"
                else f"Accusé de {recipient} : {'traité' if ok else 'en erreur'} — {detail}"
            )
        ),
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "subtype": [
            {"system": LIFECYCLE, "code": "disclose", "display": "Disclose"},
            {
                "system": f"{PROJECT}/CodeSystem/delivery-event",
                "code": event or ("acknowledged" if ok else "refused"),
            },
        ],
        "action": "R",
        "recorded": recorded,
        "outcome": "0" if ok else "8",
        "outcomeDesc": f"acknowledgement from {recipient}: {detail}",
        "agent": _agents(None, recipient),
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "what": {"identifier": {"system": "urn:ietf:rfc:3986", "value": urn(message_id)}},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "description": f"message {message_id} (MessageHeader.id)",
            }
        ],
    }


REST = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
INTERACTION = "http://hl7.org/fhir/restful-interaction"
_ACTIONS = {"create": "C", "update": "U", "delete": "D", "read": "R", "search-type": "E", "operation": "E"}


def _requestor(who: str) -> Json:
    return {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"display": who},
        "requestor": True,
    }


def rest_event(
    interaction: str,
    what: str,
    who: str,
    recorded: str,
    *,
    outcome: str = "0",
    text: str | None = None,
    query: str | None = None,
    patient: Ident | None = None,
) -> Json:
    """A REST interaction worth proving (IHE BALP patterns): a consent or directory change (create,
    update, delete of a versioned reference), a read of the audit itself (a search, with its query),
    or a refused attempt (``outcome`` 4, with the reason).  ``who`` is the client's non-secret id."""
    description = text or f"{interaction} {what} by {who}"
    entity: Json = {
        "what": {"reference": what},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
    }
    if query is not None:
        entity["query"] = base64.b64encode(query.encode()).decode()
        entity["description"] = query[:500]
    event: Json = {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", "rest", interaction, what, who, recorded, description, str(uuid.uuid4())),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(description)),
        "type": REST,
        "subtype": [{"system": INTERACTION, "code": interaction}],
        "action": _ACTIONS.get(interaction, "E"),
        "recorded": recorded,
        "outcome": outcome,
        "outcomeDesc": description,
        "agent": [_requestor(who)],
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [entity, *([_patient_entity(patient)] if patient is not None else [])],
    }
    return event


def authentication_event(what: str, who: str, address: str | None, text: str, recorded: str, count: int = 1) -> Json:
    """A refused authentication (DICOM 110114 User Authentication, subtype 110122 Login, outcome 4), which a
    REST event would not say: ``what`` the method and route template tried, ``who`` the caller as far as
    known (never a secret), ``address`` where it called from, and ``count`` the refusals this one record
    stands for (refusals are coalesced so that an unauthenticated caller cannot flood the log)."""
    agent = _requestor(who)
    if address:
        agent["network"] = {"address": address, "type": "2"}  # network-type 2: IP address
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", "authentication", what, who, recorded, text, str(uuid.uuid4())),
        "meta": {"security": [{"system": CATEGORY_SYSTEM, "code": "logistics"}]},
        "text": nv.generated(nv.para(text)),
        "type": {"system": DCM, "code": "110114", "display": "User Authentication"},
        "subtype": [{"system": DCM, "code": "110122", "display": "Login"}],
        "action": "E",
        "recorded": recorded,
        "outcome": "4",
        "outcomeDesc": text,
        "agent": [agent],
        "source": {
            "observer": OBSERVER,
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "what": {"display": what},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "detail": [{"type": "refusals", "valueString": str(count)}],
            }
        ],
    }
