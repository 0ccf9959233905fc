"""Stage — consent: may this recipient see this category of this patient's data, now?

Decision and enforcement are separate: :func:`decide` is pure given the consents and the policy and
returns a :class:`Decision` — the categories (medical, social, logistics) and HL7 sensitivity codes
the recipient may receive, each with the rule or the exact Consent version that decided it.
:mod:`gateway.redact` enforces it.

Consents are FHIR R4 ``Consent`` resources, stored with their versions.  The decision is made at send
time with the versions valid at that instant, so a later objection or revocation applies to
everything not yet delivered while earlier deliveries stay explained by the version that allowed them.
Provisions are read as R4 defines them — the root provision permits or denies, nested provisions are
exceptions — applied in the order the consents were given.  An actor is designated by a directory
reference or identifier, or by its *kind* (``actor-kind`` code, or the groups ``care-team`` /
``outside-care-team``) when the reference carries only a display.  A consent given by the patient
after a legal protection (tutelle) began is not valid: the legal representative consents then.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.directory import Recipient
from gateway.errors import IngestError, Where
from gateway.policy import Policy

__all__ = ["Basis", "ConsentStore", "Decision", "MemoryConsentStore", "PatientIndex", "decide", "what_is_missing"]

PatientKey = tuple[str, str]  # (identifier system, value) of a patient: how consents and legal representatives name her

Json = dict[str, Any]
CATEGORY_SYSTEM = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
SENSITIVITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PURPOSE = "COC"  # v3-ActReason: coordination of care
PURPOSES_COVERING_COC = {"COC", "TREAT", "CAREMGT"}  # purposes a care-coordination disclosure falls under
CATEGORIES = ("medical", "social", "logistics")
DISCLOSURE_ACTIONS = {"disclose", "access", "use"}  # consentaction codes that concern sending
NARROWING = ("class", "code", "data", "dataPeriod")  # provision elements that restrict which data
GUARDIAN_CODES = {"GUARD", "POWATT", "HPOWATT", "DPOWATT", "SPOWATT"}


@dataclass(frozen=True, slots=True)
class Basis:
    """Why a category is (not) allowed: a policy rule, or a Consent version."""

    rule: str  # e.g. "policy:care-team", "policy:consent-required", "consent:permit", "consent:deny"
    text: str
    consent: str | None = None  # "Consent/<id>/_history/<version>"


@dataclass(frozen=True, slots=True)
class Decision:
    recipient: str
    kind: str | None
    care_team: bool
    categories: frozenset[str]
    sensitive: frozenset[str]  # HL7 sensitivity codes this recipient may receive
    by_category: Mapping[str, Basis]
    by_sensitivity: Mapping[str, Basis] = field(default_factory=dict)
    ignored: tuple[Basis, ...] = ()  # consents not taken into account, and why
    at: str = ""

    @property
    def consents(self) -> tuple[str, ...]:
        """The Consent versions that decided something for this recipient."""
        found = [b.consent for b in (*self.by_category.values(), *self.by_sensitivity.values()) if b.consent]
        return tuple(dict.fromkeys(found))

    def why_not(self, category: str) -> Basis:
        return self.by_category.get(category, Basis("policy:fail-closed", f"nothing allows {category}"))


@dataclass(frozen=True, slots=True)
class ConsentVersion:
    id: str
    version: str
    valid_from: datetime
    resource: Json = field(repr=False, compare=False, hash=False)

    @property
    def ref(self) -> str:
        return f"Consent/{self.id}/_history/{self.version}"


class ConsentStore(Protocol):
    def versions(self) -> Sequence[Sequence[ConsentVersion]]:
        """Every consent's versions, oldest first."""

    @property
    def related(self) -> Sequence[Json]:
        """RelatedPerson resources: legal representatives, with the start of their mandate."""

    def about(self, patient_ids: Collection[PatientKey]) -> tuple[Sequence[Sequence[ConsentVersion]], Sequence[Json]]:
        """The consents (every version) that name one of ``patient_ids`` as their patient in any of their
        versions, and the RelatedPersons that name one of them or no one (:data:`UNATTRIBUTED`)."""


# the key of what names no patient identifier (no system, or no value): a Consent of no one, and a
# RelatedPerson that might be anyone's legal representative (stored before the identifier was required,
# or read from a file), so every patient's decision takes it into account — and says so — rather than
# let a protected adult's own consent count
UNATTRIBUTED: PatientKey = ("", "")


def patient_key(resource: Mapping[str, Any]) -> PatientKey:
    """Whose a Consent or RelatedPerson is: its ``patient.identifier`` (a reference alone names no one we
    can match, so both are stored only with the identifier: :func:`what_is_missing`)."""
    ident = (resource.get("patient") or {}).get("identifier") or {}
    system, value = ident.get("system"), ident.get("value")
    return (str(system), str(value)) if system and value else UNATTRIBUTED


def what_is_missing(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """What the decision stage needs of a Consent or RelatedPerson beyond structure, as (OperationOutcome
    issue code, text); ``None`` when nothing is.  The API and ``gateway consents import`` refuse with it."""
    ident = (body.get("patient") or {}).get("identifier") or {}
    kind = body.get("resourceType")
    if kind not in ("Consent", "RelatedPerson"):
        return None
    if not ident.get("system") or not ident.get("value"):
        return "required", f"{kind}.patient must carry the patient's identifier (INS or IPP)"
    if kind == "RelatedPerson":
        return None
    if body.get("status") not in ("active", "inactive", "rejected", "draft", "proposed", "entered-in-error"):
        return "code-invalid", f"Consent.status {body.get('status')!r} is not a FHIR R4 consent-state"
    if not body.get("dateTime"):
        return "required", "Consent.dateTime (when it was given) is required"
    provision = body.get("provision")
    if not isinstance(provision, dict) or provision.get("type") not in ("permit", "deny"):
        return "required", "Consent.provision with type permit or deny is required"
    return None


def about_patient(
    versions: Iterable[Sequence[ConsentVersion]], related: Iterable[Json], patient_ids: Collection[PatientKey]
) -> tuple[list[Sequence[ConsentVersion]], list[Json]]:
    """:meth:`ConsentStore.about` by reading everything (a store small enough, or read once)."""
    named = set(patient_ids) - {UNATTRIBUTED}
    representing = named | {UNATTRIBUTED}
    return (
        [group for group in versions if not named.isdisjoint(_keys(group))],
        [person for person in related if patient_key(person) in representing],
    )


class PatientIndex:
    """Consents and legal representatives by the patient they name, each by its id.

    A decision reads its own patient's: reading every patient's consents at each decision cost time in
    proportion to all the consents ever stored — three times per letter, one per recipient.  A change
    makes a new index from the old one (:meth:`changed`), sharing what it leaves alone: rebuilding it
    whole at each consent change took ~45 ms at 20,000 consents.  Never mutated once made (shared
    between threads)."""

    __slots__ = ("_consents", "_related")

    def __init__(self, consents: Iterable[Sequence[ConsentVersion]] = (), related: Iterable[Json] = ()) -> None:
        self._consents: dict[PatientKey, dict[str, Sequence[ConsentVersion]]] = {}
        self._related: dict[PatientKey, dict[str, Json]] = {}
        for group in consents:
            for key in _keys(group):
                self._consents.setdefault(key, {})[group[0].id] = group
        for person in related:
            self._related.setdefault(patient_key(person), {})[str(person.get("id"))] = person

    def changed(
        self,
        consents: Mapping[str, Sequence[ConsentVersion] | None],
        related: Mapping[str, Json | None],
        before: tuple[Mapping[str, Sequence[ConsentVersion]], Mapping[str, Json]],
    ) -> PatientIndex:
        """A new index where these consents and RelatedPersons (by id; ``None``: gone) replace what
        ``before`` (consents, related by id) held under those ids."""
        made = PatientIndex()
        made._consents, made._related = dict(self._consents), dict(self._related)
        copied: set[tuple[int, PatientKey]] = set()

        def bucket(index: dict[PatientKey, dict[str, Any]], kind: int, key: PatientKey) -> dict[str, Any]:
            if (kind, key) not in copied:  # copy on write: the old index stays as it was
                copied.add((kind, key))
                index[key] = dict(index.get(key, {}))
            return index[key]

        for rid, group in consents.items():
            if rid in before[0]:
                for key in _keys(before[0][rid]):
                    bucket(made._consents, 0, key).pop(rid, None)
            for key in _keys(group or ()):
                bucket(made._consents, 0, key)[rid] = group
        for rid, person in related.items():
            if rid in before[1]:
                bucket(made._related, 1, patient_key(before[1][rid])).pop(rid, None)
            if person is not None:
                bucket(made._related, 1, patient_key(person))[rid] = person
        return made

    def about(self, patient_ids: Collection[PatientKey]) -> tuple[list[Sequence[ConsentVersion]], list[Json]]:
        """This patient's consents and legal representatives (with those naming no patient: see
        :data:`UNATTRIBUTED`), each list in id order."""
        keys = set(patient_ids) - {UNATTRIBUTED}
        consents = {rid: g for key in keys for rid, g in self._consents.get(key, {}).items()}
        related = {rid: r for key in (*keys, UNATTRIBUTED) for rid, r in self._related.get(key, {}).items()}
        return [consents[rid] for rid in sorted(consents)], [related[rid] for rid in sorted(related)]


def _keys(group: Sequence[ConsentVersion]) -> Iterable[PatientKey]:
    """The patients a consent names, in any of its versions."""
    return dict.fromkeys(patient_key(v.resource) for v in group)


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class MemoryConsentStore:
    """Consents and their versions, in memory (loaded from a Bundle or added one by one)."""

    def __init__(self) -> None:
        self._versions: dict[str, list[ConsentVersion]] = {}
        self.related: list[Json] = []  # RelatedPerson resources (legal representatives)

    def add(self, consent: Json, *, source: str = "consents") -> ConsentVersion:
        if consent.get("resourceType") != "Consent" or not consent.get("id"):
            raise IngestError("a Consent with an id is required", where=Where(source=source))
        versions = self._versions.setdefault(str(consent["id"]), [])
        meta = consent.get("meta") or {}
        version = str(meta.get("versionId") or len(versions) + 1)
        valid_from = _instant(meta.get("lastUpdated")) or _instant(consent.get("dateTime"))
        if valid_from is None:
            raise IngestError(
                f"Consent/{consent['id']} has neither meta.lastUpdated nor dateTime: when it applies is unknown",
                where=Where(source=source),
            )
        if any(v.version == version for v in versions):
            raise IngestError(f"Consent/{consent['id']} version {version} given twice", where=Where(source=source))
        entry = ConsentVersion(str(consent["id"]), version, valid_from, consent)
        versions.append(entry)
        versions.sort(key=lambda v: v.valid_from)
        return entry

    def load_bundle(self, bundle: Mapping[str, Any], source: str = "consents") -> None:
        if bundle.get("resourceType") != "Bundle":
            raise IngestError("the consents file must be a FHIR Bundle", where=Where(source=source))
        for entry in bundle.get("entry", []):
            res = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(res, dict):
                continue
            if res.get("resourceType") == "Consent":
                self.add(res, source=source)
            elif res.get("resourceType") == "RelatedPerson":
                self.related.append(res)

    def versions(self) -> Sequence[Sequence[ConsentVersion]]:
        return list(self._versions.values())

    def about(self, patient_ids: Collection[PatientKey]) -> tuple[list[Sequence[ConsentVersion]], list[Json]]:
        return about_patient(self._versions.values(), self.related, patient_ids)


def _patient_matches(consent: Mapping[str, Any], patient_ids: set[tuple[str, str]]) -> bool:
    key = patient_key(consent)
    return key != UNATTRIBUTED and key in patient_ids


def _covers(period: Mapping[str, Any] | None, at: datetime) -> bool:
    if not period:
        return True
    start, end = _instant(period.get("start")), _instant(period.get("end"))
    return (start is None or start <= at) and (end is None or at <= end)


def _guardianship_start(known: Iterable[Json], extra: Iterable[Json]) -> datetime | None:
    starts = []
    for person in (*known, *extra):
        codes = {c.get("code") for rel in person.get("relationship", []) for c in rel.get("coding", [])}
        if codes & GUARDIAN_CODES:
            start = _instant((person.get("period") or {}).get("start"))
            if start is not None:
                starts.append(start)
    return min(starts) if starts else None


def _performed_by_patient(consent: Mapping[str, Any], patient_ids: set[tuple[str, str]]) -> bool:
    for performer in consent.get("performer", []):
        ident = performer.get("identifier") or {}
        if (str(ident.get("system")), str(ident.get("value"))) in patient_ids:
            return True
        if str(performer.get("reference", "")).split("/")[-2:-1] == ["Patient"]:
            return True
    return False


def _actor_matches(actor: Mapping[str, Any], recipient: Recipient, policy: Policy) -> bool:
    ref = actor.get("reference") or {}
    target = ref.get("reference")
    if isinstance(target, str):
        # the role itself, or the person behind it (a consent naming Dr X covers each of her roles)
        tail = "/".join(target.split("/")[-2:])
        own = {"/".join(recipient.ref.split("/")[-2:])}
        if recipient.practitioner is not None:
            own.add(f"Practitioner/{recipient.practitioner.get('id')}")
        return target == recipient.ref or tail in own
    ident = ref.get("identifier")
    if isinstance(ident, Mapping):
        return (str(ident.get("system")), str(ident.get("value"))) in recipient.identifiers
    for coding in (actor.get("role") or {}).get("coding", []):
        if coding.get("system") == policy.actor_kind_system and policy.matches_group(
            str(coding.get("code")), recipient.kind
        ):
            return True
    return False


def _labels(provision: Mapping[str, Any]) -> tuple[set[str], set[str], bool]:
    """(categories, sensitivity codes, everything) named by a provision's securityLabel."""
    labels = provision.get("securityLabel") or []
    if not labels:
        return set(CATEGORIES), set(), True
    cats = {str(c.get("code")) for c in labels if c.get("system") == CATEGORY_SYSTEM and c.get("code") in CATEGORIES}
    sens = {str(c.get("code")) for c in labels if c.get("system") == SENSITIVITY_SYSTEM}
    return cats, sens, False


def decide(
    patient_ids: Iterable[tuple[str, str]],
    recipient: Recipient,
    at: datetime,
    store: ConsentStore,
    policy: Policy,
    *,
    related: Iterable[Json] = (),
) -> Decision:
    """What this recipient may receive about this patient at instant ``at``, and why."""
    ids = set(patient_ids)
    care_team = policy.in_care_team(recipient.kind)
    defaults = policy.without_consent.for_kind(recipient.kind, care_team)
    # one (immutable) Basis per rule, shared by the categories it decides: they are compared by value
    label = policy.label(recipient.kind)
    by_default = (True, Basis("policy:care-team", f"{label}: équipe de soins (L.1110-12)"))
    outside = (
        False,
        Basis("policy:consent-required", f"{label}: hors équipe de soins, consentement requis (L.1110-4)"),
    )
    state: dict[str, tuple[bool, Basis]] = {}
    for category in CATEGORIES:
        if category in defaults:
            state[category] = by_default
        elif care_team:
            state[category] = (False, Basis("policy:care-team-limit", f"policy gives the care team no {category} data"))
        else:
            state[category] = outside
    sensitive: dict[str, tuple[bool, Basis]] = {}
    team_sensitive = (True, Basis("policy:care-team", "équipe de soins"))
    for code in policy.sensitive:
        if care_team:
            sensitive[code] = team_sensitive
        else:
            sensitive[code] = (False, Basis("policy:sensitive", f"{code}: consentement explicite requis"))
    ignored: list[Basis] = []
    consents, representatives = store.about(ids)  # this patient's: another's guardian is not hers
    guardian_since = _guardianship_start(representatives, related)
    unattributed = [p for p in representatives if patient_key(p) == UNATTRIBUTED and _guardianship_start([p], [])]
    if unattributed:
        names = ", ".join(f"RelatedPerson/{p.get('id')}" for p in unattributed)
        ignored.append(
            Basis(
                "consent:representative-unattributed",
                f"{names} names no patient identifier: taken as possibly this patient's legal representative",
            )
        )

    valid: list[tuple[datetime, ConsentVersion]] = []
    for versions in consents:
        current = [v for v in versions if v.valid_from <= at]
        if not current or not _patient_matches(current[-1].resource, ids):
            continue
        version = current[-1]
        consent = version.resource
        given = _instant(consent.get("dateTime")) or version.valid_from
        if consent.get("status") != "active":
            ignored.append(
                Basis(
                    "consent:not-active",
                    f"status {consent.get('status')} since {version.valid_from.isoformat()}",
                    version.ref,
                )
            )
            continue
        if given > at:
            continue
        if guardian_since is not None and given >= guardian_since and _performed_by_patient(consent, ids):
            ignored.append(
                Basis(
                    "consent:invalid-performer",
                    f"given by the patient under legal protection since {guardian_since.date().isoformat()}: "
                    "the legal representative must consent",
                    version.ref,
                )
            )
            continue
        valid.append((given, version))

    def apply(provision: Mapping[str, Any], version: ConsentVersion, inherited: bool) -> bool:
        """Apply one provision (not its nested ones); whether it applies, for them to inherit."""
        actors = provision.get("actor") or []
        applies = any(_actor_matches(a, recipient, policy) for a in actors) if actors else inherited
        purposes = {p.get("code") for p in provision.get("purpose", [])}
        if purposes and PURPOSE not in purposes and not purposes & PURPOSES_COVERING_COC:
            applies = False
        if not _covers(provision.get("period"), at):
            applies = False
        actions = {c.get("code") for a in provision.get("action", []) for c in a.get("coding", [])}
        if actions and not actions & DISCLOSURE_ACTIONS:
            applies = False  # about collecting or correcting, not about sending
        permit = provision.get("type", "permit") == "permit"
        narrowed = [k for k in NARROWING if provision.get(k)]
        if applies and permit and narrowed:
            # a permit limited to some resources, documents or data: the gateway cannot honour the
            # limit element by element, so it grants nothing rather than too much (a deny applies whole)
            ignored.append(
                Basis(
                    "consent:narrowed-permit",
                    f"permit limited by {', '.join(narrowed)}: not applied (fail closed)",
                    version.ref,
                )
            )
            applies = False
        if applies:
            cats, sens, everything = _labels(provision)
            basis = Basis(
                "consent:permit" if permit else "consent:deny",
                f"{'autorisé' if permit else 'refusé'} par le consentement du {str(version.resource.get('dateTime', ''))[:10]}",
                version.ref,
            )
            for category in cats:
                state[category] = (permit, basis)
            for code in sens if not everything else (set(policy.sensitive) if not permit else set()):
                sensitive[code] = (permit, basis)
        return applies

    for _, version in sorted(valid, key=lambda item: item[0]):
        provision = version.resource.get("provision")
        if isinstance(provision, Mapping):
            # depth first, each provision before its nested ones, in order (a later one overrides); a
            # loop, not recursion: a closure calling itself is a reference cycle only the collector frees
            pending: list[tuple[Mapping[str, Any], bool]] = [(provision, True)]
            while pending:
                node, inherited = pending.pop()
                applies = apply(node, version, inherited)
                pending.extend((nested, applies) for nested in reversed(node.get("provision", [])))
        else:
            ignored.append(Basis("consent:no-provision", "consent without provision: nothing to apply", version.ref))

    allowed = frozenset(c for c, (ok, _) in state.items() if ok)
    allowed_sensitive = frozenset(c for c, (ok, _) in sensitive.items() if ok and "medical" in allowed)
    return Decision(
        recipient.id,
        recipient.kind,
        care_team,
        allowed,
        allowed_sensitive,
        {c: b for c, (_, b) in state.items()},
        {c: b for c, (_, b) in sensitive.items()},
        tuple(ignored),
        at.isoformat(timespec="seconds"),
    )
