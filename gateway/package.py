"""Stage — package: one recipient's view becomes a FHIR R4 message Bundle.

``Bundle.type = message``, the ``MessageHeader`` first, ``focus`` on the recipient's Communication
(https://hl7.org/fhir/R4/messaging.html).  ``MessageHeader.id`` and ``Bundle.id`` are derived from
the letter and the recipient, so every retry of the same message carries the same identity and a
receiver applying FHIR reliable messaging can drop duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway import __version__
from gateway.directory import Recipient
from gateway.label import CONFIDENTIALITY, INLINE_LABEL
from gateway.redact import View
from gateway.translate import narrative as nv
from gateway.translate.build import PROJECT
from gateway.translate.ids import resource_id, urn

__all__ = ["EVENT", "EXT_REPLACES", "WITHDRAWAL", "Sender", "message", "withdrawal"]

EXT_REPLACES = f"{PROJECT}/StructureDefinition/replaces-message"

Json = dict[str, Any]
EVENT = {
    "system": f"{PROJECT}/CodeSystem/message-event",
    "code": "discharge-notification",
    "display": "Discharge notification",
}


WITHDRAWAL = {
    "system": f"{PROJECT}/CodeSystem/message-event",
    "code": "discharge-withdrawal",
    "display": "Discharge letter withdrawn",
}


@dataclass(frozen=True, slots=True)
class Sender:
    """The gateway as a message source."""

    name: str = "discharge-gateway"
    endpoint: str = "https://gateway.invalid/fhir"


def message(
    view: View, letter_key: str, timestamp: str, sender: Sender, category_system: str, replaces: str | None = None
) -> Json:
    """The message Bundle for one recipient (its MessageHeader and every resource of its view).

    ``replaces`` is the MessageHeader id of the message this one supersedes (a new version of the letter,
    same setId): the receiver must replace, not add, what it got before.
    """
    recipient = view.recipient
    assert recipient.endpoint is not None, "route only passes reachable recipients"
    assert view.communication is not None, "every view has its own Communication"
    header_id = resource_id("MessageHeader", letter_key, recipient.id)
    senders = _sender_ids(view.communication)  # the author: the PractitionerRole that sent the Communication
    author = None
    if senders:
        author = next(
            (urn(r["id"]) for r in view.resources if r["resourceType"] == "PractitionerRole" and r["id"] in senders),
            None,
        )
    lines = [("Adresse", recipient.endpoint.address)]
    if replaces:
        lines.append(("Remplace", f"le message {replaces} (version précédente de la lettre)"))
    label = {"system": category_system, "code": "logistics"}
    focus = view.communication["id"]
    header = _header(header_id, EVENT, recipient, sender, focus, label, lines, author=author, replaces=replaces)
    entries = [header, *view.resources]
    wanted = (category_system, CONFIDENTIALITY)
    labels: dict[tuple[str, str], Json] = {}
    for res in entries:
        meta = res.get("meta")
        for coding in meta.get("security", ()) if meta else ():
            system = coding.get("system")
            if system in wanted:
                key = (system, coding["code"])
                if key not in labels:
                    labels[key] = {"system": system, "code": coding["code"]}
    return {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", letter_key, recipient.id, "message"),
        "meta": {"security": list(labels.values())},
        "type": "message",
        "timestamp": timestamp,
        "entry": [{"fullUrl": urn(r["id"]), "resource": r} for r in entries],
    }


def _header(
    header_id: str,
    event: Json,
    recipient: Recipient,
    sender: Sender,
    focus: str,
    label: Json,
    lines: list[tuple[str, str]],
    *,
    author: str | None = None,
    replaces: str | None = None,
) -> Json:
    """A MessageHeader to one recipient (its narrative: the event, the recipient, then ``lines``)."""
    assert recipient.endpoint is not None
    header: Json = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "meta": {"security": [label]},
        "text": nv.generated(nv.dl([("Message", event["display"]), ("Destinataire", recipient.display), *lines])),
        "eventCoding": event,
        "destination": [
            {
                "name": recipient.display,
                "endpoint": recipient.endpoint.address,
                "receiver": {"reference": recipient.ref, "display": recipient.display},
            }
        ],
        "source": {
            "name": sender.name,
            "software": "discharge-gateway",
            "version": __version__,
            "endpoint": sender.endpoint,
        },
        "focus": [{"reference": urn(focus)}],
    }
    if author:
        header["sender"] = {"reference": author}
    if replaces:
        header["extension"] = [{"url": EXT_REPLACES, "valueId": replaces}]
    return header


def _sender_ids(communication: Mapping[str, Any]) -> list[str]:
    ref = (communication.get("sender") or {}).get("reference", "")
    return [ref.removeprefix("urn:uuid:")] if ref else []


def withdrawal(
    recipient: Recipient, letter_key: str, timestamp: str, sender: Sender, category_system: str, replaces: str
) -> Json:
    """The notice for a recipient of an earlier version that the new version is no longer addressed to:
    set message ``replaces`` aside.  It names the earlier message only — no patient, no content: the
    recipient may no longer be entitled to any of it (a corrected médecin traitant, a withdrawn
    consent)."""
    assert recipient.endpoint is not None, "only a recipient reached before is told"
    label = {"system": category_system, "code": "logistics"}
    text = (
        f"Le message {replaces} (compte rendu de sortie) a été remplacé par une nouvelle version qui ne vous "
        "est pas adressée : ne le prenez plus en compte."
    )
    communication: Json = {
        "resourceType": "Communication",
        "id": resource_id("Communication", letter_key, recipient.id, "withdrawal"),
        "meta": {"security": [label]},
        "text": nv.generated(nv.dl([("Retrait", text)])),
        "status": "completed",
        "sent": timestamp,
        "recipient": [{"display": recipient.display}],
        "payload": [
            {"extension": [{"url": INLINE_LABEL, "valueCoding": label}], "contentString": text}
        ],  # labelled inline like every payload: logistics
    }
    header = _header(
        resource_id("MessageHeader", letter_key, recipient.id, "withdrawal"),
        WITHDRAWAL,
        recipient,
        sender,
        communication["id"],
        label,
        [("Retire", f"le message {replaces} (version précédente de la lettre)")],
        replaces=replaces,
    )
    return {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", letter_key, recipient.id, "withdrawal"),
        "meta": {"security": [label]},
        "type": "message",
        "timestamp": timestamp,
        "entry": [{"fullUrl": urn(r["id"]), "resource": r} for r in (header, communication)],
    }
