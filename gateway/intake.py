"""Letters in at the door: one path for every edge (``POST /letters``, ``$process-message``, MLLP).

The rule "a letter is accepted only once it is stored" lives here, once: translate, route, then store
the letter with its deliveries and its audit in one transaction (the same document again is the same
letter: idempotent).  A refusal is audited here too, with no content kept.  The edges only turn the
outcome into their own answer (an HTTP status and body, an HL7 ACK).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway import audit
from gateway.errors import GatewayError, SenderNotAllowed, TooLarge, Where
from gateway.mappings import Mappings
from gateway.model import Letter
from gateway.outbox import Outbox
from gateway.pipeline import prepare
from gateway.policy import policy_from
from gateway.route import route
from gateway.settings import ANY_ORGANIZATION, Settings
from gateway.store import ResourceStore, StoreSnapshot
from gateway.translate.ids import resource_id

__all__ = ["Accepted", "Intake"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A stored letter: its id, whether this call created it (False: the same letter again), and who
    it will go to."""

    letter_id: str
    created: bool
    recipients: int
    routing_exceptions: tuple[str, ...]
    prepared: Any  # gateway.pipeline.Prepared: what the caller may check against (e.g. HL7 PID-3)


class Intake:
    """Accept (translate → route → durable commit with audit) or refuse (audited) one letter.

    Thread-safe: the edges call it from worker threads so their event loops stay free.
    ``on_accepted(letter_id, prepared)`` tells an in-process delivery worker about a new letter: its
    deliveries are then held for that worker (it has the translation; another process would translate
    the letter again) for ``HOLD`` (or the claim lease, if shorter) at first; the worker renews the hold
    while it lives and lets a letter go once it has waited too long (:mod:`gateway.deliver`), so any
    worker takes them ``HOLD`` after the accepting process stopped.
    ``source`` names the door (``http``, ``mllp``) in the metrics.
    """

    HOLD = timedelta(seconds=5)

    def __init__(
        self,
        settings: Settings,
        store: ResourceStore,
        outbox: Outbox,
        mappings: Mappings,
        on_accepted: Callable[[str, Any], None] | None = None,
        source: str = "http",
    ) -> None:
        self.settings, self.outbox, self.mappings, self.on_accepted = settings, outbox, mappings, on_accepted
        self.source = source
        self.policy = policy_from(mappings)
        self.snapshot = StoreSnapshot(store, self.policy)
        lease = timedelta(seconds=settings.claim_lease_seconds)
        self.hold = min(self.HOLD, lease) if on_accepted is not None else timedelta(0)
        self.senders = {name: self._aliases(orgs) for name, orgs in settings.sender_organizations.items()}

    def _aliases(self, organizations: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        """The organisations as translated letters name them too: ``urn:oid:<root>`` is also the system the
        ``identifier-systems`` table gives that root, if another."""
        table = self.mappings.codes.get("identifier-systems")
        out = set(organizations)
        for system, value in organizations:
            entry = table.entries.get(system.removeprefix("urn:oid:")) if table is not None else None
            if system.startswith("urn:oid:") and isinstance(entry, dict) and entry.get("system"):
                out.add((str(entry["system"]), value))
        return frozenset(out)

    def check_sender(self, sender: str, letter: Letter) -> None:
        """Refuse a letter its sender may not send (``GATEWAY_SENDER_ORGANIZATIONS``; unset: any sender may
        send any letter).  The establishment is the letter's custodian — the organisation answerable for the
        document, which CDA requires — or, when the custodian carries no identifier, the author's
        organisation: an authenticated hospital system cannot put letters in another establishment's name."""
        if not self.senders:
            return
        allowed = self.senders.get(sender)
        if allowed is None:
            raise SenderNotAllowed(
                f"sender {sender} is bound to no establishment (GATEWAY_SENDER_ORGANIZATIONS): "
                "its letters are refused until an operator lists the organisations it sends for"
            )
        if ANY_ORGANIZATION in allowed:
            return
        organization = letter.custodian if letter.custodian and letter.custodian.ids else None
        what = "custodian"
        if organization is None and letter.author and letter.author.organization and letter.author.organization.ids:
            organization, what = letter.author.organization, "author's organisation"
        where = Where(
            path="Composition.custodian" if letter.format.startswith("fhir") else "/ClinicalDocument/custodian"
        )
        if organization is None:
            raise SenderNotAllowed(
                "the letter names no custodian organisation identifier (nor an author organisation): which "
                f"establishment it is sent for is unknown, so it cannot be checked against sender {sender}'s",
                where=where,
            )
        if not {(i.system, i.value) for i in organization.ids} & allowed:
            mine = ", ".join(sorted(f"{s}|{v}" for s, v in self.settings.sender_organizations[sender]))
            theirs = ", ".join(f"{i.system}|{i.value}" for i in organization.ids)
            named = f"{organization.name} " if organization.name else ""
            raise SenderNotAllowed(
                f"sender {sender} sends letters for {mine}; this letter's {what} is {named}({theirs})", where=where
            )

    def accept(
        self,
        raw: bytes,
        media_type: str,
        client: str,
        now: datetime,
        check: Callable[[Any], None] | None = None,
        sender: str | None = None,
    ) -> Accepted:
        """Translate, route and store in one transaction; raises a :class:`GatewayError` on refusal.

        ``sender`` names the authenticated client for :meth:`check_sender` (``client`` itself unless the
        edge audits a longer name).  ``check(prepared)`` runs after translation and before anything is
        stored: an edge's own consistency rule (it raises to refuse, and then nothing is stored)."""
        if len(raw) > self.settings.max_document_bytes:
            raise TooLarge(f"letter over the {self.settings.max_document_bytes}-byte limit")
        prepared = prepare(raw, name="letter", mappings=self.mappings, settings=self.settings, now=now)
        self.check_sender(client if sender is None else sender, prepared.result.translation.letter)
        if check is not None:
            check(prepared)
        routing = route(prepared.resources, self.snapshot.directory(), self.policy)
        letter = prepared.result.translation.letter
        recorded = now.isoformat(timespec="seconds")
        events = [
            audit.route_event(e, prepared.patient, prepared.letter_key, recorded, i)
            for i, e in enumerate(routing.events)
        ]
        deliveries = [
            (
                resource_id("MessageHeader", prepared.letter_key, r.recipient.id),
                r.recipient.id,
                r.recipient.ref,
                r.recipient.endpoint.address if r.recipient.endpoint else "",
            )
            for r in routing.routed
        ]
        set_key = f"{letter.set_id.system}|{letter.set_id.value}" if letter.set_id else None
        letter_id, created = self.outbox.accept(
            document_key=prepared.letter_key,
            set_key=set_key,
            version=letter.version,
            client=client,
            media_type=media_type,
            body=raw,
            deliveries=deliveries,
            audit_events=events,
            now=now,
            source=self.source,
            hold=self.hold,
        )
        if created and self.on_accepted is not None:
            self.on_accepted(letter_id, prepared)
        return Accepted(letter_id, created, len(deliveries), tuple(e.text for e in routing.exceptions), prepared)

    def refuse(self, error: GatewayError, client: str, now: datetime) -> None:
        """Audit a refused letter: the issue code and the reason, never the content."""
        code = getattr(error, "code", None)  # an HTTP-level refusal carries its own OperationOutcome code
        issue = code if isinstance(code, str) else error.issue_code
        text = " ".join(error.message.split())[:300]
        self.outbox.audit([audit.refusal_event(issue, text, client, now.isoformat())])
