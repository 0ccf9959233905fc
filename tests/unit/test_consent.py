"""Consent decisions: the care team by default, everyone else only with consent, at send time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.consent import ConsentVersion, MemoryConsentStore, PatientIndex, about_patient, decide
from gateway.directory import Recipient
from gateway.policy import policy_from
from tests.conftest import mappings

INS = ("urn:oid:1.2.250.1.213.1.4.10", "244037511305285")
KIND = "https://fhir.discharge-gateway.fr/CodeSystem/actor-kind"
CAT = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
SAAD = Recipient("Organization-saad", "https://dir.example.fr/Organization/saad", "home-help", "SAAD", {})
NURSE = Recipient("PractitionerRole-ide", "https://dir.example.fr/PractitionerRole/ide", "nurse", "IDE", {})
GP = Recipient("PractitionerRole-gp", "https://dir.example.fr/PractitionerRole/gp", "gp", "GP", {})
REFERENT = Recipient(
    "PractitionerRole-ref", "https://dir.example.fr/PractitionerRole/ref", "social-worker", "Référente", {}
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def consent(
    cid: str,
    when: str,
    provision: dict[str, Any],
    *,
    version: str = "1",
    status: str = "active",
    performer: dict[str, Any] | None = None,
    updated: str | None = None,
) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "meta": {"versionId": version, "lastUpdated": updated or when},
        "status": status,
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": INS[0], "value": INS[1]}},
        "dateTime": when,
        "performer": [performer or {"identifier": {"system": INS[0], "value": INS[1]}}],
        "provision": provision,
    }


def kind_actor(kind: str) -> dict[str, Any]:
    return {"role": {"coding": [{"system": KIND, "code": kind}]}, "reference": {"display": kind}}


def labels(*codes: str) -> list[dict[str, str]]:
    return [
        {"system": CAT, "code": c}
        if c in ("medical", "social", "logistics")
        else {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": c}
        for c in codes
    ]


def run(recipient: Recipient, when: str, *consents: dict[str, Any], related: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    store = MemoryConsentStore()
    for c in consents:
        store.add(c)
    return decide({INS}, recipient, at(when), store, policy_from(mappings()), related=related or [])


def test_care_team_receives_everything_without_consent() -> None:
    decision = run(NURSE, "2026-10-30T12:00:00+01:00")
    assert decision.categories == {"medical", "social", "logistics"}
    assert "PSY" in decision.sensitive
    assert decision.by_category["medical"].rule == "policy:care-team"


def test_outside_care_team_receives_nothing_without_consent() -> None:
    decision = run(SAAD, "2026-10-30T12:00:00+01:00")
    assert decision.categories == frozenset()
    assert decision.by_category["logistics"].rule == "policy:consent-required"


def test_consent_by_kind_grants_only_the_named_categories() -> None:
    permit = consent(
        "c1",
        "2026-10-28T10:00:00+01:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    decision = run(SAAD, "2026-10-30T12:00:00+01:00", permit)
    assert decision.categories == {"logistics"}
    assert decision.by_category["logistics"].consent == "Consent/c1/_history/1"
    assert run(REFERENT, "2026-10-30T12:00:00+01:00", permit).categories == frozenset()


def test_objection_then_revocation_apply_at_send_time() -> None:
    permit = consent(
        "c1",
        "2026-01-10T10:00:00+01:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    objection = consent("c2", "2026-10-01T10:00:00+02:00", {"type": "deny", "actor": [kind_actor("outside-care-team")]})
    withdrawn = consent(
        "c2",
        "2026-10-01T10:00:00+02:00",
        {"type": "deny", "actor": [kind_actor("outside-care-team")]},
        version="2",
        status="inactive",
        updated="2026-11-10T09:00:00+01:00",
    )
    assert run(SAAD, "2026-09-01T12:00:00+02:00", permit, objection, withdrawn).categories == {"logistics"}
    during = run(SAAD, "2026-10-30T12:00:00+01:00", permit, objection, withdrawn)
    assert during.categories == frozenset()
    assert during.by_category["logistics"].consent == "Consent/c2/_history/1"
    after = run(SAAD, "2026-11-15T12:00:00+01:00", permit, objection, withdrawn)
    assert after.categories == {"logistics"}
    assert any(b.consent == "Consent/c2/_history/2" for b in after.ignored)


def test_objection_to_the_care_team_is_honoured() -> None:
    deny = consent(
        "c3",
        "2026-10-28T10:00:00+01:00",
        {
            "type": "deny",
            "actor": [{"role": {"coding": [{"system": "x", "code": "IRCP"}]}, "reference": {"reference": GP.ref}}],
            "securityLabel": labels("medical"),
        },
    )
    decision = run(GP, "2026-10-30T12:00:00+01:00", deny)
    assert "medical" not in decision.categories and "logistics" in decision.categories
    assert decision.sensitive == frozenset()  # no medical, no sensitive either


def test_sensitive_codes_need_their_own_consent() -> None:
    permit = consent(
        "c4",
        "2026-10-28T10:00:00+01:00",
        {
            "type": "permit",
            "actor": [
                {"role": {"coding": [{"system": "x", "code": "IRCP"}]}, "reference": {"reference": REFERENT.ref}}
            ],
            "securityLabel": labels("medical", "social", "logistics"),
            "provision": [{"type": "deny", "securityLabel": labels("ETH")}],
        },
    )
    decision = run(REFERENT, "2026-10-30T12:00:00+01:00", permit)
    assert decision.categories == {"medical", "social", "logistics"}
    assert "ETH" not in decision.sensitive and "PSY" not in decision.sensitive
    explicit = consent(
        "c5",
        "2026-10-29T10:00:00+01:00",
        {
            "type": "permit",
            "actor": [
                {"role": {"coding": [{"system": "x", "code": "IRCP"}]}, "reference": {"reference": REFERENT.ref}}
            ],
            "securityLabel": labels("PSY"),
        },
    )
    assert "PSY" in run(REFERENT, "2026-10-30T12:00:00+01:00", permit, explicit).sensitive


def test_under_tutelle_only_the_legal_representative_consents() -> None:
    tutor = {
        "resourceType": "RelatedPerson",
        "id": "tutor",
        "patient": {"reference": "Patient/p"},
        "relationship": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "GUARD"}]}
        ],
        "period": {"start": "2019-06-20"},
    }
    by_tutor = consent(
        "t1",
        "2019-07-10T10:00:00+02:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics", "social")},
        performer={"reference": "RelatedPerson/tutor"},
    )
    by_patient = consent(
        "p1",
        "2019-08-01T10:00:00+02:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("medical")},
    )
    decision = run(SAAD, "2019-08-15T12:00:00+02:00", by_tutor, by_patient, related=[tutor])
    assert decision.categories == {"logistics", "social"}
    assert any(b.rule == "consent:invalid-performer" for b in decision.ignored)


def test_consent_dated_after_send_time_does_not_apply() -> None:
    later = consent(
        "c6",
        "2026-12-01T10:00:00+01:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    assert run(SAAD, "2026-10-30T12:00:00+01:00", later).categories == frozenset()


def test_another_patients_consent_is_ignored() -> None:
    other = consent(
        "c7",
        "2026-10-28T10:00:00+01:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    other["patient"] = {"identifier": {"system": INS[0], "value": "199999999999999"}}
    assert run(SAAD, "2026-10-30T12:00:00+01:00", other).categories == frozenset()


def test_a_permit_limited_to_some_data_grants_nothing() -> None:
    """Fail closed: the gateway cannot honour a 'only the care plan' limit element by element."""
    narrowed = consent(
        "c8",
        "2026-10-28T10:00:00+01:00",
        {
            "type": "permit",
            "actor": [kind_actor("home-help")],
            "securityLabel": labels("logistics"),
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "CarePlan"}],
        },
    )
    decision = run(SAAD, "2026-10-30T12:00:00+01:00", narrowed)
    assert decision.categories == frozenset()
    assert any(b.rule == "consent:narrowed-permit" for b in decision.ignored)


def test_a_provision_about_collection_does_not_govern_disclosure() -> None:
    collect = consent(
        "c9",
        "2026-10-28T10:00:00+01:00",
        {
            "type": "permit",
            "actor": [kind_actor("home-help")],
            "securityLabel": labels("logistics"),
            "action": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "collect"}]}
            ],
        },
    )
    assert run(SAAD, "2026-10-30T12:00:00+01:00", collect).categories == frozenset()


def test_a_consent_naming_the_person_covers_her_role() -> None:
    person = Recipient(
        "PractitionerRole-ref",
        "https://dir.example.fr/PractitionerRole/ref",
        "social-worker",
        "Référente",
        {},
        {"resourceType": "Practitioner", "id": "nguyen"},
    )
    permit = consent(
        "c10",
        "2026-10-28T10:00:00+01:00",
        {
            "type": "permit",
            "securityLabel": labels("social", "logistics"),
            "actor": [
                {
                    "role": {"coding": [{"system": "x", "code": "IRCP"}]},
                    "reference": {"reference": "https://dir.example.fr/Practitioner/nguyen"},
                }
            ],
        },
    )
    assert run(person, "2026-10-30T12:00:00+01:00", permit).categories == {"social", "logistics"}


def test_kinds_from_cda_profession_codes() -> None:
    policy = policy_from(mappings())
    assert policy.kind_of([("urn:oid:1.2.250.1.213.1.1.4.5", "G15_10/SM54")]) == "gp"
    assert policy.kind_of([("urn:oid:1.2.250.1.213.1.1.4.5", "G15_10/SM26")]) == "physician"
    assert policy.kind_of([("urn:oid:1.2.250.1.213.1.1.4.5", "G15_60")]) == "nurse"
    assert policy.kind_of([("urn:oid:1.2.250.1.213.1.1.4.5", "G15_99")]) is None


def _guardian(patient: str, start: str) -> dict[str, Any]:
    return {
        "resourceType": "RelatedPerson",
        "id": f"guardian-{patient}",
        "patient": {"identifier": {"system": INS[0], "value": patient}},
        "relationship": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "GUARD"}]}
        ],
        "period": {"start": start},
    }


def test_another_patients_guardian_does_not_void_this_patients_consent() -> None:
    """Guardianship is the patient's own: a guardian of someone else in the store changes nothing here,
    her own guardian (stored, named by identifier) makes her own later consent invalid."""
    own = consent(
        "p1",
        "2026-10-01T10:00:00+02:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    store = MemoryConsentStore()
    store.add(own)
    store.related.append(_guardian("199999999999999", "2019-06-20"))
    decision = decide({INS}, SAAD, at("2026-10-30T12:00:00+01:00"), store, policy_from(mappings()))
    assert decision.categories == {"logistics"}
    assert not decision.ignored
    store.related.append(_guardian(INS[1], "2019-06-20"))
    decision = decide({INS}, SAAD, at("2026-10-30T12:00:00+01:00"), store, policy_from(mappings()))
    assert decision.categories == frozenset()
    assert [b.rule for b in decision.ignored] == ["consent:invalid-performer"]


class _OnlyAbout(MemoryConsentStore):
    """A store that fails if a decision reads every patient's consents instead of its own patient's."""

    def versions(self) -> Any:
        raise AssertionError("a decision read every consent")

    def about(self, patient_ids: Any) -> Any:
        return PatientIndex(super().versions(), self.related).about(patient_ids)


def test_a_decision_reads_only_its_patients_consents() -> None:
    store = _OnlyAbout()
    for n in range(50):
        other = consent(
            f"other-{n}", "2026-10-01T10:00:00+02:00", {"type": "permit", "actor": [kind_actor("home-help")]}
        )
        other["patient"] = {"identifier": {"system": INS[0], "value": f"1{n:014d}"}}
        store.add(other)
    store.add(
        consent(
            "mine",
            "2026-10-01T10:00:00+02:00",
            {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("social")},
        )
    )
    decision = decide({INS}, SAAD, at("2026-10-30T12:00:00+01:00"), store, policy_from(mappings()))
    assert decision.categories == {"social"} and decision.consents == ("Consent/mine/_history/1",)


def test_the_index_finds_what_reading_everything_finds() -> None:
    """In the store's order, a consent found by any of its versions' patients, guardians by theirs."""
    versions: list[list[ConsentVersion]] = []
    for n, patients in enumerate([["A"], ["B"], ["A", "B"], ["C"], ["A"]]):
        group = []
        for v, patient in enumerate(patients, start=1):
            body = consent(f"c{n}", f"2026-10-0{v}T10:00:00+02:00", {"type": "permit"}, version=str(v))
            body["patient"] = {"identifier": {"system": INS[0], "value": patient}}
            group.append(ConsentVersion(f"c{n}", str(v), at(f"2026-10-0{v}T10:00:00+02:00"), body))
        versions.append(group)
    related = [{**_guardian(p, "2020-01-01"), "id": f"g{n}"} for n, p in enumerate(("B", "A", "C", "A"))]
    index = PatientIndex(versions, related)
    for ids in ([], ["A"], ["B"], ["A", "B"], ["C", "A"], ["Z"]):
        keys = {(INS[0], p) for p in ids}
        assert index.about(keys) == about_patient(versions, related, keys), ids
    assert [g[0].id for g in index.about({(INS[0], "B")})[0]] == ["c1", "c2"]


def test_a_guardian_naming_no_patient_counts_for_everyone_and_is_said() -> None:
    """A legal representative stored without the patient's identifier (before one was required, or in a
    file) may be this patient's: her own later consent is not taken — fail closed — and the decision
    says which record is to blame, through the store's index as through a plain list."""
    own = consent(
        "p1",
        "2026-10-01T10:00:00+02:00",
        {"type": "permit", "actor": [kind_actor("home-help")], "securityLabel": labels("logistics")},
    )
    for patient in ({"reference": "Patient/p"}, {"identifier": {"value": INS[1]}}):  # no identifier, no system
        nameless = {**_guardian(INS[1], "2019-06-20"), "id": "nameless", "patient": patient}
        store = MemoryConsentStore()
        store.add(own)
        store.related.append(nameless)
        indexed = _OnlyAbout()
        indexed.add(own)
        indexed.related.append(nameless)
        _decided_with_the_nameless_guardian(store)
        _decided_with_the_nameless_guardian(indexed)


def _decided_with_the_nameless_guardian(source: MemoryConsentStore) -> None:
    decision = decide({INS}, SAAD, at("2026-10-30T12:00:00+01:00"), source, policy_from(mappings()))
    assert decision.categories == frozenset()
    assert [b.rule for b in decision.ignored] == ["consent:representative-unattributed", "consent:invalid-performer"]
    assert "RelatedPerson/nameless" in decision.ignored[0].text
