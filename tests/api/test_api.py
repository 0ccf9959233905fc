"""The HTTP API: authentication, versioned consents and directory, OperationOutcome on every refusal,
and a consent edited through the API changing what the next dispatch sends."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.pipeline import dispatch_letter
from gateway.policy import policy_from
from gateway.settings import Settings
from gateway.store import ResourceStore, SqlConsentStore, directory_from_store
from tests.conftest import FIXTURES, mappings

ADMIN = "admin-key-0123456789abcdef"
AUDITOR = "auditor-key-0123456789abcdef"
HIS = "his-key-0123456789abcdef0000"
S6 = FIXTURES / "dispatch"


@pytest.fixture
def store(database_url: str) -> Iterator[ResourceStore]:
    store = ResourceStore(database_url)
    yield store
    store.engine.dispose()


@pytest.fixture
def client(store: ResourceStore) -> Iterator[TestClient]:
    settings = Settings(
        api_keys={ADMIN: frozenset({"admin"}), AUDITOR: frozenset({"auditor"}), HIS: frozenset({"his"})}
    )
    with TestClient(create_app(settings, store)) as test_client:
        yield test_client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _consents() -> list[dict[str, Any]]:
    bundle = orjson.loads((S6 / "consents-s6.json").read_bytes())
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Consent"]


def _is_outcome(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    return body


def test_unauthenticated_and_wrong_role_are_refused(client: TestClient) -> None:
    consent = _consents()[0]
    _is_outcome(client.get("/Consent"), 401)
    _is_outcome(client.post("/Consent", json=consent, headers={"X-API-Key": "not-a-key-at-all-000"}), 401)
    _is_outcome(client.post("/Consent", json=consent, headers=_auth(AUDITOR)), 403)
    _is_outcome(client.get("/Consent", headers=_auth(HIS)), 403)
    assert client.post("/Consent", json=consent, headers=_auth(ADMIN)).status_code == 201


def test_consents_are_versioned(client: TestClient) -> None:
    first, second = _consents()[:2] if len(_consents()) > 1 else (_consents()[0], _consents()[0])
    created = client.post("/Consent", json={**first, "id": "opposition"}, headers=_auth(ADMIN))
    assert created.status_code == 201 and created.json()["meta"]["versionId"] == "1"
    assert created.headers["Location"] == "Consent/opposition/_history/1"
    changed = copy.deepcopy(first)
    changed["status"] = "inactive"
    updated = client.put("/Consent/opposition", json={**changed, "id": "opposition"}, headers=_auth(ADMIN))
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    history = client.get("/Consent/opposition/_history", headers=_auth(AUDITOR)).json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    assert client.get("/Consent/opposition/_history/1", headers=_auth(AUDITOR)).json()["status"] == "active"
    patient = first["patient"]["identifier"]
    found = client.get(f"/Consent?patient={patient['system']}|{patient['value']}", headers=_auth(AUDITOR)).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["meta"]["versionId"] == "2"
    assert client.delete("/Consent/opposition", headers=_auth(ADMIN)).status_code == 204
    _is_outcome(client.get("/Consent/opposition", headers=_auth(AUDITOR)), 404)
    assert second


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"resourceType": "Patient", "id": "x"}', 400),
        (b'{"resourceType": "Consent", "status": "active"}', 422),
        (b'{"resourceType": "Consent", "status": "bogus", "scope": {"text": "x"}, "category": [{"text": "x"}]}', 422),
    ],
)
def test_bad_consents_get_an_operation_outcome(client: TestClient, body: bytes, status: int) -> None:
    _is_outcome(
        client.post("/Consent", content=body, headers={**_auth(ADMIN), "Content-Type": "application/fhir+json"}), status
    )


def test_a_legal_representative_must_name_the_patient_by_identifier(client: TestClient) -> None:
    """A guardian that names no patient identifier could be nobody's or anybody's: refused, not guessed."""
    guardian = {
        "resourceType": "RelatedPerson",
        "id": "tutor",
        "patient": {"reference": "Patient/p"},
        "relationship": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "GUARD"}]}
        ],
    }
    refused = client.put("/RelatedPerson/tutor", json=guardian, headers=_auth(ADMIN))
    _is_outcome(refused, 422)
    assert "RelatedPerson.patient must carry the patient's identifier" in refused.text
    guardian["patient"] = {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "232127511301974"}}
    assert client.put("/RelatedPerson/tutor", json=guardian, headers=_auth(ADMIN)).status_code == 201


def test_unknown_type_and_mismatched_id(client: TestClient) -> None:
    _is_outcome(client.get("/Observation/1", headers=_auth(ADMIN)), 404)
    consent = {**_consents()[0], "id": "a"}
    _is_outcome(client.put("/Consent/b", json=consent, headers=_auth(ADMIN)), 400)


def test_directory_is_editable(client: TestClient) -> None:
    bundle = orjson.loads((S6 / "directory.json").read_bytes())
    for entry in bundle["entry"]:
        res = entry["resource"]
        response = client.put(f"/{res['resourceType']}/{res['id']}", json=res, headers=_auth(ADMIN))
        assert response.status_code == 201, response.text
    found = client.get("/Organization?identifier=https://finess.esante.gouv.fr|750999021", headers=_auth(ADMIN)).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["saad-tilleuls"]


def test_a_consent_edited_through_the_api_changes_the_next_dispatch(client: TestClient, store: ResourceStore) -> None:
    """S6 through the API: the objection stops the SAAD; a new version lets logistics through."""
    bundle = orjson.loads((S6 / "directory.json").read_bytes())
    for entry in bundle["entry"]:
        res = entry["resource"]
        client.put(f"/{res['resourceType']}/{res['id']}", json=res, headers=_auth(ADMIN))
    versions = sorted(_consents(), key=lambda c: c["meta"]["versionId"])
    objection, extension = versions[0], versions[-1]
    assert client.post("/Consent", json=objection, headers=_auth(ADMIN)).status_code == 201

    def saad_categories() -> frozenset[str]:
        policy = policy_from(mappings())
        result = dispatch_letter(
            (S6 / "ldl-ses-s6-objection.xml").read_bytes(),
            name="s6.xml",
            mappings=mappings(),
            settings=Settings(),
            directory=directory_from_store(store, policy),
            consents=SqlConsentStore(store),
            at=datetime.now().astimezone(),
        )
        return result.decisions["Organization-saad-tilleuls"].categories

    assert saad_categories() == frozenset()
    response = client.put(f"/Consent/{objection['id']}", json=extension, headers=_auth(ADMIN))
    assert response.status_code == 200 and response.json()["meta"]["versionId"] == "2"
    assert saad_categories() == {"logistics"}


def test_openapi_is_served(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
