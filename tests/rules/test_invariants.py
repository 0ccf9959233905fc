"""Rule tests: properties that must hold for every translated letter, whatever its format."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from lxml import etree

from gateway import validate
from gateway.label import INLINE_LABEL, categories_of, inline_category
from gateway.translate.build import EXT_CHANGE
from tests.conftest import CASES, available_cases, resources, run_case

CATEGORY_SYSTEM = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
CATEGORIES = {"medical", "social", "logistics"}
CASE_NAMES = available_cases()


def _references(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_references(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_references(item))
    return found


def test_every_case_is_present() -> None:
    """The corpus must not silently shrink: every listed case has its files."""
    assert sorted(CASE_NAMES) == sorted(CASES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_resource_is_valid_r4(case: str) -> None:
    result = run_case(case)
    problems = []
    for res in resources(result):
        try:
            get_fhir_model_class(res["resourceType"]).model_validate(res)
        except Exception as exc:  # pydantic ValidationError; the message names the element
            problems.append(f"{res['resourceType']}/{res['id']}: {exc}")
    assert problems == []
    Bundle.model_validate(result.bundle)
    # and the stricter FHIR JSON rules the models do not enforce (no empty arrays, real booleans, XHTML div)
    for res in resources(result):
        assert validate.problems(res, fhir_json=True) == []


@pytest.mark.parametrize("case", CASE_NAMES)
def test_one_patient_and_all_references_resolve(case: str) -> None:
    result = run_case(case)
    bundle = result.bundle
    patients = [r for r in resources(result) if r["resourceType"] == "Patient"]
    assert len(patients) == 1
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(full_urls) == len(set(full_urls)), "duplicate fullUrl"
    ids = [r["id"] for r in resources(result)]
    assert len(ids) == len(set(ids)), "duplicate id"
    for ref in _references(bundle):
        assert ref in full_urls, f"unresolved reference {ref}"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_resource_has_a_category_and_a_narrative(case: str) -> None:
    for res in resources(run_case(case)):
        cats = categories_of(res, CATEGORY_SYSTEM)
        assert cats and cats <= CATEGORIES, f"{res['resourceType']} labelled {cats}"
        assert res["text"]["status"] == "generated"
        assert res["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
        etree.fromstring(res["text"]["div"])  # well-formed XHTML
        elements = res.get("activity") if res["resourceType"] == "CarePlan" else res.get("payload", [])
        for element in elements or []:
            inline = inline_category(element, CATEGORY_SYSTEM)
            assert inline in CATEGORIES, f"{res['resourceType']} element {element.get('id')} unlabelled"
            assert inline in cats, "resource labels must cover its elements' labels"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_medication_statements_and_list(case: str) -> None:
    result = run_case(case)
    by_url = {e["fullUrl"]: e["resource"] for e in result.bundle["entry"]}
    statements = [r for r in resources(result) if r["resourceType"] == "MedicationStatement"]
    for st in statements:
        assert st["status"] in {
            "active",
            "completed",
            "entered-in-error",
            "intended",
            "stopped",
            "on-hold",
            "unknown",
            "not-taken",
        }
    lists = [r for r in resources(result) if r["resourceType"] == "List"]
    assert len(lists) <= 1
    rows = result.translation.built.changes
    if not lists:
        assert rows == []
        return
    entries = lists[0].get("entry", [])
    assert len(entries) == len(rows)
    for entry in entries:
        assert entry["flag"]["coding"] and entry["flag"]["text"]
        target = by_url[entry["item"]["reference"]]
        assert target["resourceType"] == "MedicationStatement"
        ext = next(e for e in target["extension"] if e["url"] == EXT_CHANGE)
        parts = {p["url"]: p for p in ext["extension"]}
        assert parts["basis"]["valueCode"] in {"stated", "derived", "unknown"}
        assert parts["status"]["valueCoding"]["display"] == entry["flag"]["text"]
        if "reason" in parts:
            notes = [n["text"] for n in target.get("note", [])] + [s["text"] for s in target.get("statusReason", [])]
            assert any(n in parts["reason"]["valueString"] for n in notes), "reason detached from its line"


def _table_rows(xhtml: bytes) -> list[list[str]]:
    root = etree.fromstring(xhtml)
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    return [["".join(td.itertext()) for td in tr.findall("h:td", ns)] for tr in root.findall(".//h:tbody/h:tr", ns)]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_change_table_matches_the_list(case: str) -> None:
    result = run_case(case)
    comm = next(r for r in resources(result) if r["resourceType"] == "Communication")
    lists = [r for r in resources(result) if r["resourceType"] == "List"]
    table = next((p for p in comm["payload"] if p.get("id") == "change-table"), None)
    if not lists:
        assert table is None
        return
    assert table is not None, "the GP summary must carry the change table"
    assert any(p.get("contentReference", {}).get("reference") == f"urn:uuid:{lists[0]['id']}" for p in comm["payload"])
    rows = _table_rows(base64.b64decode(table["contentAttachment"]["data"]))
    entries = lists[0].get("entry", [])
    assert len(rows) == len(entries)
    for row, entry in zip(rows, entries, strict=True):
        drug, _before, _after, change, _reason = row
        assert drug == entry["item"]["display"]
        assert change.startswith(entry["flag"]["text"])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_no_prior_means_unknown_novelty(case: str) -> None:
    _letter, priors = CASES[case]
    result = run_case(case)
    if priors or result.translation.letter.has_admission_list:
        return
    for change in result.translation.built.changes:
        if change.related:  # compared with the old posology the letter lists as stopped: a stated fact
            assert change.basis.value == "derived" and all(r.section.value == "stopped" for r in change.related)
            continue
        assert change.status.value in {"unknown", "stopped"}, "novelty guessed without an admission list"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_drug_codes_come_from_the_sources(case: str) -> None:
    """Every medication code in the output appears in the letter or its prior lists (nothing invented)."""
    letter, priors = CASES[case]
    from tests.conftest import fixture_path

    sources = fixture_path(letter).read_bytes() + b"".join(fixture_path(p).read_bytes() for p in priors)
    for res in resources(run_case(case)):
        if res["resourceType"] != "MedicationStatement":
            continue
        for coding in res["medicationCodeableConcept"].get("coding", []):
            assert re.search(re.escape(coding["code"]).encode(), sources), coding


def test_inline_label_extension_url_is_ds4p() -> None:
    assert INLINE_LABEL.startswith("http://hl7.org/fhir/uv/security-label-ds4p/")
