"""The audit through the service: scenario S6 (the patient objects to social actors) pushed, delivered
and then read back from the audit API — the GP's delivery, the CLIC's withheld items with the
objecting Consent — with the chain verified; searches, exports, the patient report, refused callers
and consent changes all leave their own audited trace."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.auditlog import verify
from gateway.deliver import Deliverer
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from gateway.transports.http import HttpTransport
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_service import Receiver

HIS = "his-key-audit-0123456789abcdef"
AUDITOR = "auditor-key-0123456789abcdef"
ADMIN = "admin-key-audit-0123456789ab"
DISPATCH = FIXTURES / "dispatch"
PATIENT = "urn:oid:1.2.250.1.213.1.4.10|248057511410235"


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def s6(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    signer = Signer(generate_key())
    receiver = Receiver(tmp_path / "rx.db", signer)
    receiver.start()
    engine = make_engine(database_url)
    store = ResourceStore(engine=engine)
    outbox = Outbox(engine, signer, checkpoint_every=2)
    seed_store(store, lambda ep: f"{receiver.url}/fhir/{ep}", ["consents-s6.json"])
    keys = {HIS: frozenset({"his"}), AUDITOR: frozenset({"auditor"}), ADMIN: frozenset({"admin"})}
    settings = Settings(api_keys=keys)
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=signer,
        transports={"http": HttpTransport(timeout=2.0)},
    )
    with TestClient(create_app(settings, store, outbox, mappings())) as client:
        answer = client.post(
            "/letters",
            content=(DISPATCH / "ldl-ses-s6-objection.xml").read_bytes(),
            headers={**_h(HIS), "Content-Type": "application/hl7-cda+xml"},
        )
        assert answer.status_code == 202, answer.text
        while worker.run_once():
            pass
        yield {
            "client": client,
            "letter": answer.json()["letterId"],
            "engine": engine,
            "signer": signer,
            "outbox": outbox,
        }
    worker.close()
    receiver.stop()
    engine.dispose()


def _search(client: TestClient, **params: str) -> dict[str, Any]:
    answer = client.get("/AuditEvent", params=params, headers=_h(AUDITOR))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _recipient(event: dict[str, Any]) -> str:
    return next(a["who"].get("reference", "") for a in event["agent"] if a["type"]["coding"][0]["code"] == "110152")


def test_s6_audit_shows_the_gp_delivery_the_clic_withheld_items_and_the_objecting_consent(s6: dict[str, Any]) -> None:
    client = s6["client"]
    found = _search(client, patient=PATIENT, letter=s6["letter"], subtype="disclose")
    events = [e["resource"] for e in found["entry"]]
    by_recipient: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_recipient.setdefault(_recipient(event), []).append(event)
    gp = [e for r, es in by_recipient.items() if "gp-" in r for e in es]
    assert gp and any("attempt 1: " in e["outcomeDesc"] and e["outcome"] == "0" for e in gp), "the GP's delivery"
    assert any(d.get("description") == "sent" for e in gp for d in e["entity"]), "what the GP was sent is listed"
    clic = [e for r, es in by_recipient.items() if "clic" in r for e in es]
    assert clic, f"the CLIC's decision is audited (recipients: {sorted(by_recipient)})"
    withheld = [d for e in clic for d in e["entity"] if d.get("description", "").startswith("withheld")]
    assert withheld, "the CLIC's withheld items are listed"
    consents = {d["valueString"] for w in withheld for d in w["detail"] if d["type"] == "consent"}
    assert any(c.startswith("Consent/s6-opposition/_history/") for c in consents), consents
    assert not any(d.get("description") == "sent" and "medical" in str(d) for e in clic for d in e["entity"])
    report = verify(s6["engine"], [s6["signer"].key])
    assert report.ok, report.problems
    assert report.checkpoints >= 1


def test_searches_page_and_filter(s6: dict[str, Any]) -> None:
    client = s6["client"]
    everything = _search(client, letter=s6["letter"])
    total = everything["total"]
    assert total >= 3
    first = _search(client, letter=s6["letter"], _count="2")
    assert len(first["entry"]) == 2 and first["total"] == total
    following = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(following, headers=_h(AUDITOR)).json()
    assert [e["resource"]["id"] for e in second["entry"]] == [e["resource"]["id"] for e in everything["entry"][2:4]]
    assert _search(client, patient="248057511410235")["total"] >= total
    assert _search(client, patient="urn:oid:1.2.250.1.213.1.4.10|000")["total"] == 0
    assert _search(client, letter=s6["letter"], date="lt2000-01-01")["total"] == 0
    assert _search(client, letter=s6["letter"], date="ge2000-01-01")["total"] == total
    assert _search(client, recipient="PractitionerRole/gp-perrin")["total"] >= 1
    chained = everything["entry"][0]["resource"]["extension"]
    assert {x["url"].rsplit("/", 1)[1] for x in chained} == {
        "audit-chain-seq",
        "audit-chain-hash",
        "audit-chain-previous",
    }
    bad = client.get("/AuditEvent", params={"date": "yesterday"}, headers=_h(AUDITOR))
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"


def test_exports_give_every_record_as_csv_and_ndjson(s6: dict[str, Any]) -> None:
    client = s6["client"]
    total = _search(client, letter=s6["letter"])["total"]
    as_csv = client.get("/AuditEvent/$export", params={"letter": s6["letter"], "_format": "csv"}, headers=_h(AUDITOR))
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == total and all(len(r["hash"]) == 64 for r in rows)
    assert all(r["letter"] == s6["letter"] for r in rows)
    as_ndjson = client.get("/AuditEvent/$export", params={"letter": s6["letter"]}, headers=_h(AUDITOR))
    lines = [orjson.loads(line) for line in as_ndjson.content.splitlines()]
    assert len(lines) == total and {line["resourceType"] for line in lines} == {"AuditEvent"}


def test_the_patient_report_says_who_received_what_and_what_was_held_back(s6: dict[str, Any]) -> None:
    client = s6["client"]
    answer = client.get("/Patient/$audit-report", params={"identifier": PATIENT}, headers=_h(AUDITOR))
    assert answer.status_code == 200, answer.text
    listing = answer.json()["entry"][0]["resource"]
    assert listing["resourceType"] == "List" and listing["subject"]["identifier"]["value"] == "248057511410235"
    items = [e["item"]["display"] for e in listing["entry"]]
    assert any("gp" in i.lower() or "perrin" in i.lower() for i in items), items
    assert any(
        "withheld" in e["flag"]["text"] and not e["flag"]["text"].startswith("0 sent, 0") for e in listing["entry"]
    )
    from gateway import validate

    assert validate.check_with_models(listing) == [], "the report is valid FHIR R4"


def test_a_caller_without_the_role_gets_403_and_the_attempt_is_audited(s6: dict[str, Any]) -> None:
    client = s6["client"]
    refused = client.get("/AuditEvent", headers=_h(HIS))
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert client.get("/AuditEvent").status_code == 401
    denied = _search(client, outcome="4", subtype="operation")
    assert any("needs the role auditor or admin" in e["resource"]["outcomeDesc"] for e in denied["entry"])


def test_reads_of_the_audit_and_consent_changes_are_audited(s6: dict[str, Any]) -> None:
    client = s6["client"]
    _search(client, patient=PATIENT)
    reads = _search(client, subtype="search-type")
    assert reads["total"] >= 1
    consent = orjson.loads((DISPATCH / "consents-s6.json").read_bytes())["entry"][-1]["resource"]
    consent = {k: v for k, v in consent.items() if k != "meta"}
    assert client.put("/Consent/s6-opposition", json=consent, headers=_h(ADMIN)).status_code == 200
    changes = _search(client, subtype="update")["entry"]
    assert any(e["resource"]["entity"][0]["what"]["reference"] == "Consent/s6-opposition/_history/3" for e in changes)
    assert verify(s6["engine"], [s6["signer"].key]).ok
