"""Property: whatever the letter says and whatever the consents, nothing reaches a recipient not entitled to it.

Generated cases start from the dispatch scenarios, write drug names and diagnosis words of the letter
into the free text of its plan (where home-help and social tasks live), and draw random consents
(permit or deny, by actor kind or group, any categories, sometimes a sensitivity code).  The leak
detector (tests/rules/leaks.py) is independent of the redaction code.  The last tests show the
detector failing on a deliberately broken redaction, and the free-text scanner catching a deliberately
broken label rule.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import redact, validate
from gateway.consent import Decision, MemoryConsentStore
from gateway.mappings import builtin_dir, load_mappings
from gateway.pipeline import dispatch_letter
from gateway.settings import Settings
from gateway.translate.registry import SECTION_TRANSLATORS
from tests.conftest import FIXTURES, mappings
from tests.dispatch_cases import SCENARIOS, directory, store
from tests.rules.leaks import DIAGNOSES, leaks

BASES = ["s1-pharmacy", "s5", "s6-t1", "s7"]
KINDS = ["home-help", "social-service", "social-worker", "coordination", "outside-care-team", "care-team", "gp"]
CATEGORY = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
HL7 = "{urn:hl7-org:v3}"
WORDS = ["KARDEGIC", "FUROSEMIDE", "LEPONEX", "AOTAL", "SERTRALINE", "MIANSERINE", "C10AA05", "F32.1", *DIAGNOSES]


def _plan_texts(root: etree._Element) -> list[etree._Element]:
    for section in root.iter(f"{HL7}section"):
        code = section.find(f"{HL7}code")
        if code is not None and code.get("code") == "18776-5":
            return [e for e in section.iter(f"{HL7}td", f"{HL7}content", f"{HL7}paragraph", f"{HL7}item") if e.text]
    return []


class Case:
    """A generated dispatch input, with a short repr for failure reports."""

    def __init__(self, base: str, instant: str, raw: bytes, consents: list[dict[str, Any]], edits: list[str]) -> None:
        self.base, self.instant, self.raw, self.consents, self.edits = base, instant, raw, consents, edits

    def __repr__(self) -> str:
        provisions = [
            (
                c["provision"]["type"],
                c["provision"]["actor"][0]["role"]["coding"][0]["code"],
                [x["code"] for x in c["provision"].get("securityLabel", [])],
            )
            for c in self.consents
        ]
        return f"Case({self.base}, edits={self.edits}, consents={provisions})"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    base = draw(st.sampled_from(BASES))
    letter, _, instant, _ = SCENARIOS[base]
    root = etree.fromstring((FIXTURES / letter).read_bytes())
    texts = _plan_texts(root)
    edits = []
    for element in draw(st.lists(st.sampled_from(texts), max_size=4)) if texts else []:
        word = draw(st.sampled_from(WORDS))
        edits.append(f"{(element.text or '')[:20]}…+{word}")
        element.text = f"{element.text} — {word}"
    consents = []
    for index in range(draw(st.integers(0, 4))):
        categories = draw(st.lists(st.sampled_from(["medical", "social", "logistics"]), unique=True, max_size=3))
        labels = [{"system": CATEGORY, "code": c} for c in categories]
        if draw(st.booleans()):
            labels.append({"system": V3, "code": draw(st.sampled_from(["PSY", "ETH"]))})
        kind = draw(st.sampled_from(KINDS))
        consents.append(
            {
                "resourceType": "Consent",
                "id": f"gen-{index}",
                "meta": {"versionId": "1", "lastUpdated": "2026-10-01T10:00:00+02:00"},
                "status": "active",
                "scope": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
                    ]
                },
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"identifier": _patient_ins(root)},
                "dateTime": f"2026-10-0{index + 1}T10:00:00+02:00",
                "provision": {
                    "type": draw(st.sampled_from(["permit", "deny"])),
                    "actor": [
                        {
                            "role": {
                                "coding": [
                                    {"system": "https://fhir.discharge-gateway.fr/CodeSystem/actor-kind", "code": kind}
                                ]
                            },
                            "reference": {"display": kind},
                        }
                    ],
                    **({"securityLabel": labels} if labels else {}),
                },
            }
        )
    return Case(base, instant, etree.tostring(root), consents, edits)


def _patient_ins(root: etree._Element) -> dict[str, str]:
    ident = root.find(f"{HL7}recordTarget/{HL7}patientRole/{HL7}id")
    assert ident is not None
    return {"system": f"urn:oid:{ident.get('root')}", "value": str(ident.get("extension"))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_no_leak_whatever_the_text_and_the_consents(case: Case) -> None:
    instant, raw = case.instant, case.raw
    consent_store = MemoryConsentStore()
    for consent in case.consents:
        consent_store.add(consent)
    result = dispatch_letter(
        raw,
        name="generated.xml",
        mappings=mappings(),
        settings=Settings(),
        directory=directory(),
        consents=consent_store,
        at=datetime.fromisoformat(instant),
    )
    letter = result.translation.translation.letter
    for recipient_id, decision in result.decisions.items():
        message = result.messages.get(recipient_id)
        if not decision.categories:
            assert message is None
        elif message is not None:
            assert leaks(message, decision, letter) == [], recipient_id
            for entry in message["entry"]:  # redaction output is valid FHIR, whatever was cut
                assert validate.problems(entry["resource"], fhir_json=True) == [], entry["resource"]["resourceType"]


def _s1_dispatch(**kwargs: Any) -> Any:
    letter, consents, instant, _ = SCENARIOS["s1"]
    return dispatch_letter(
        (FIXTURES / letter).read_bytes(),
        name="s1.xml",
        settings=Settings(),
        directory=directory(),
        consents=store(consents),
        at=datetime.fromisoformat(instant),
        **kwargs,
    )


def test_the_leak_check_fails_on_a_broken_redaction() -> None:
    """A redaction that ignores the decision must be caught: the property above can fail."""

    def broken(resources: Any, decision: Decision, routed: Any, rules: Any, scanner: Any) -> redact.View:
        everything = Decision(
            decision.recipient,
            decision.kind,
            True,
            frozenset({"medical", "social", "logistics"}),
            frozenset({"PSY", "ETH", "HIV"}),
            decision.by_category,
        )
        return redact.cut(resources, everything, routed, rules, scanner)

    result = _s1_dispatch(mappings=mappings(), cutter=broken)
    saad = "Organization-saad-tilleuls"
    found = leaks(result.messages[saad], result.decisions[saad], result.translation.translation.letter)
    assert any("MedicationStatement" in f for f in found)
    assert any("names the drug" in f for f in found)


def test_a_broken_label_rule_is_caught(tmp_path: Path) -> None:
    """Label drugs 'logistics' by mistake: the free-text scanner withholds the drug lines, and the leak
    check still reports what the scanner cannot see (an emptied 'medication changes' List)."""
    base = tmp_path / "mappings"
    shutil.copytree(builtin_dir(), base)
    labels_file = base / "labels.yaml"
    data = yaml.safe_load(labels_file.read_text())
    data["resources"]["MedicationStatement"] = "logistics"
    data["resources"]["List"] = "logistics"
    labels_file.write_text(yaml.safe_dump(data, allow_unicode=True))
    broken = load_mappings(base=base, translators=SECTION_TRANSLATORS)
    result = _s1_dispatch(mappings=broken)
    saad = "Organization-saad-tilleuls"
    letter = result.translation.translation.letter
    found = leaks(result.messages[saad], result.decisions[saad], letter)
    assert not any("MedicationStatement" in f or "names the drug" in f for f in found)
    assert any(
        w.category == "free-text" and w.resource_type == "MedicationStatement" for w in result.views[saad].withheld
    )
    assert any(f.startswith("List/") for f in found), "the broken rule is reported"
