"""Labelling fails closed and follows the rules in mappings/labels.yaml."""

from __future__ import annotations

from typing import Any

from gateway.label import apply, categories_of, inline_category, rules_from
from tests.conftest import mappings

SYSTEM = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"


def _labelled(*resources: dict[str, Any]) -> list[dict[str, Any]]:
    items = list(resources)
    apply(items, rules_from(mappings()), "N")
    return items


def _activity(text: str) -> dict[str, Any]:
    return {"id": "a", "detail": {"status": "not-started", "description": text}}


def test_unknown_resource_type_is_medical() -> None:
    (res,) = _labelled({"resourceType": "Procedure", "id": "1"})
    assert categories_of(res, SYSTEM) == {"medical"}


def test_unknown_payload_is_medical() -> None:
    (res,) = _labelled(
        {"resourceType": "Communication", "id": "1", "payload": [{"id": "mystery", "contentString": "x"}]}
    )
    assert inline_category(res["payload"][0], SYSTEM) == "medical"


def test_activities_by_lexicon_medical_wins() -> None:
    (plan,) = _labelled(
        {
            "resourceType": "CarePlan",
            "id": "1",
            "activity": [
                _activity("Aide à domicile : 2 h/jour (courses, ménage)"),
                _activity("Aide à domicile pour la toilette et injection d'insuline"),
                _activity("Dossier APA à constituer avec l'assistante sociale"),
                _activity("Rapatriement du véhicule"),  # 'apa' inside a word is not the APA
            ],
        }
    )
    labels = [inline_category(a, SYSTEM) for a in plan["activity"]]
    assert labels == ["logistics", "medical", "social", "medical"]
    assert categories_of(plan, SYSTEM) == {"logistics", "medical", "social"}


def test_psychiatric_drug_is_labelled_psy_and_so_are_the_list_and_summary() -> None:
    statement = {
        "resourceType": "MedicationStatement",
        "id": "m",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "N06AB10"}]},
    }
    lst = {"resourceType": "List", "id": "l"}
    comm = {"resourceType": "Communication", "id": "c", "payload": [{"id": "change-table", "contentString": "x"}]}
    patient = {"resourceType": "Patient", "id": "p"}
    labelled = _labelled(statement, lst, comm, patient)
    codes = [{c["code"] for c in r["meta"]["security"]} for r in labelled]
    assert "PSY" in codes[0] and "PSY" in codes[1] and "PSY" in codes[2]
    assert "PSY" not in codes[3]
    assert all("N" in c for c in codes)  # the letter's confidentiality travels on every resource
