"""Stage — route: who receives this letter (Recipient List).

Recipients come from the letter itself — its médecin traitant, its intended recipients and the
performers of its CarePlan activities, all gathered in the translated CareTeam — resolved against the
directory by national identifiers (RPPS, FINESS).  Nothing is dropped silently: a letter without a
médecin traitant, an actor the directory does not know, or one without an endpoint is reported as a
routing event (audited by the caller) and goes to the policy's fallback only when the policy says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.directory import Directory, Recipient
from gateway.policy import Policy

__all__ = ["RouteEvent", "Routed", "Routing", "route"]

Json = dict[str, Any]
EventKind = Literal["no-gp", "unresolved", "unreachable", "fallback", "not-routed"]
ROLE_LABEL = {"PCP": "médecin traitant", "PRCP": "destinataire de la lettre", "PRF": "intervenant du plan de soins"}


@dataclass(frozen=True, slots=True)
class Routed:
    recipient: Recipient
    reasons: tuple[str, ...]
    members: frozenset[str] = frozenset()  # the letter's resources (urn) that stand for this actor
    fallback_for: str | None = None  # what it replaces when routed as the policy's fallback


@dataclass(frozen=True, slots=True)
class RouteEvent:
    kind: EventKind
    text: str
    member: str | None = None  # urn of the letter's resource concerned
    recipient: str | None = None  # directory recipient id, when known


@dataclass(frozen=True, slots=True)
class Routing:
    routed: tuple[Routed, ...]
    events: tuple[RouteEvent, ...] = field(default=())

    @property
    def exceptions(self) -> tuple[RouteEvent, ...]:
        """Events that make a dispatch incomplete (everything but informational ones)."""
        return tuple(e for e in self.events if e.kind != "not-routed")


def _ids(resource: Mapping[str, Any] | None) -> set[tuple[str, str]]:
    return {
        (str(i["system"]), str(i["value"]))
        for i in (resource or {}).get("identifier", [])
        if i.get("system") and i.get("value")
    }


def route(resources: Sequence[Json], directory: Directory, policy: Policy, fallback: str | None = None) -> Routing:
    """The recipients of a translated letter, and every routing exception found on the way."""
    by_url = {f"urn:uuid:{r['id']}": r for r in resources}
    team = next((r for r in resources if r["resourceType"] == "CareTeam"), None)
    routed: dict[str, Routed] = {}
    events: list[RouteEvent] = []
    fallback_ref = fallback or policy.fallback.recipient
    fallback_recipient = directory.get(fallback_ref) if fallback_ref else None
    if fallback_ref and fallback_recipient is None:
        events.append(RouteEvent("unresolved", f"the fallback {fallback_ref!r} is not in the directory"))
    needs_fallback: list[tuple[str, str]] = []

    def add(recipient: Recipient, reason: str, member: str | None) -> None:
        current = routed.get(recipient.id)
        members = frozenset({member}) if member else frozenset()
        if current is None:
            routed[recipient.id] = Routed(recipient, (reason,), members)
        else:
            reasons = current.reasons if reason in current.reasons else (*current.reasons, reason)
            routed[recipient.id] = Routed(recipient, reasons, current.members | members, current.fallback_for)

    has_gp = False
    for participant in (team or {}).get("participant", []):
        member = participant.get("member", {}).get("reference")
        codes = {c.get("code") for role in participant.get("role", []) for c in role.get("coding", [])}
        reasons = [ROLE_LABEL[c] for c in ("PCP", "PRCP", "PRF") if c in codes]
        has_gp = has_gp or "PCP" in codes
        if not reasons:
            continue  # author, family: informed through the others, not addressed
        resource = by_url.get(str(member))
        if resource is None:
            continue
        display = participant.get("member", {}).get("display") or resource.get("name") or resource["id"]
        recipient = _resolve(resource, by_url, directory)
        if recipient is None:
            events.append(RouteEvent("unresolved", f"{display} ({', '.join(reasons)}) is not in the directory", member))
            needs_fallback.append(("unresolved", f"{display} ({', '.join(reasons)})"))
            continue
        if recipient.endpoint is None:
            events.append(
                RouteEvent(
                    "unreachable",
                    f"{recipient.display} ({', '.join(reasons)}) has no endpoint in the directory",
                    member,
                    recipient.id,
                )
            )
            needs_fallback.append(("unreachable", f"{recipient.display} ({', '.join(reasons)})"))
            continue
        for reason in reasons:
            add(recipient, reason, str(member))
    if not has_gp:
        events.append(RouteEvent("no-gp", "the letter names no médecin traitant"))
        needs_fallback.append(("no-gp", "médecin traitant"))
    for cause, what in needs_fallback:
        if fallback_recipient is None or cause not in policy.fallback.when:
            continue
        if fallback_recipient.endpoint is None:
            events.append(RouteEvent("unreachable", f"the fallback {fallback_recipient.display} has no endpoint"))
            break
        current = routed.get(fallback_recipient.id)
        replaced = f"{current.fallback_for}; {what}" if current and current.fallback_for else what
        routed[fallback_recipient.id] = Routed(
            fallback_recipient,
            (*(current.reasons if current else ()), f"repli pour : {what}"),
            current.members if current else frozenset(),
            replaced,
        )
        events.append(
            RouteEvent(
                "fallback", f"{what}: routed to the fallback {fallback_recipient.display}", None, fallback_recipient.id
            )
        )
    return Routing(tuple(_with_organisation(r, resources) for r in routed.values()), tuple(events))


def _with_organisation(routed: Routed, resources: Sequence[Json]) -> Routed:
    """A person's segment includes what the letter gives to their organisation (a DAC référente, the DAC)."""
    org_ids = _ids(routed.recipient.organization)
    if not org_ids:
        return routed
    extra = {f"urn:uuid:{r['id']}" for r in resources if r["resourceType"] == "Organization" and _ids(r) & org_ids}
    return Routed(routed.recipient, routed.reasons, routed.members | extra, routed.fallback_for) if extra else routed


def _resolve(resource: Json, by_url: Mapping[str, Json], directory: Directory) -> Recipient | None:
    if resource["resourceType"] == "PractitionerRole":
        person = by_url.get(str(resource.get("practitioner", {}).get("reference")))
        org = by_url.get(str(resource.get("organization", {}).get("reference")))
        roles = directory.find_person(_ids(person), _ids(org))
        if roles:
            return roles[0]
        if not _ids(person) and org is not None:
            # addressed to an organisation without a named person (intendedRecipient/receivedOrganization)
            return directory.find_organization(_ids(org), org.get("name"))
        return None
    if resource["resourceType"] == "Organization":
        return directory.find_organization(_ids(resource), resource.get("name"))
    return None
