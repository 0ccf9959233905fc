"""Operators and receivers talking back: dead letters are visible and replayable, asynchronous
acknowledgements and FHIR document messages come in through ``POST /$process-message``."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi.testclient import TestClient

from gateway.receiver import create_receiver
from tests.conftest import FIXTURES
from tests.e2e.test_service import ADMIN, DISPATCH, HIS, world

__all__ = ["world"]

AUDITOR_FREE = {"Authorization": f"Bearer {HIS}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def _push(client: TestClient) -> str:
    answer = client.post(
        "/letters",
        content=(DISPATCH / "ldl-ses-s1-pharmacy.xml").read_bytes(),
        headers={**AUDITOR_FREE, "Content-Type": "application/hl7-cda+xml"},
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["letterId"])


def _response(message_id: str, code: str) -> bytes:
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {
            "system": "https://fhir.discharge-gateway.fr/CodeSystem/message-event",
            "code": "discharge-notification",
        },
        "source": {"endpoint": "https://receiver.example/fhir"},
        "response": {"identifier": message_id, "code": code},
    }
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "message",
            "timestamp": datetime.now(UTC).isoformat(),
            "entry": [{"fullUrl": f"urn:uuid:{header['id']}", "resource": header}],
        }
    )


def _restart_receiver(port: int, db: Path, keys: list[Any]) -> uvicorn.Server:
    server = uvicorn.Server(
        uvicorn.Config(create_receiver(f"sqlite:///{db}", keys), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/messages", timeout=0.5)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("receiver did not restart")


def test_dead_letters_are_listed_and_replayed_once_the_recipient_is_back(world: dict[str, Any], tmp_path: Path) -> None:
    client, worker, outbox, receiver = world["client"], world["worker"], world["outbox"], world["receiver"]
    receiver.stop()
    letter_id = _push(client)
    start = datetime.now(UTC)
    for hours in (0, 1, 2):
        worker.clock = lambda h=hours: start + timedelta(hours=h)
        worker.run_once()
    dead = client.get("/deliveries", params={"status": "dead-lettered"}, headers=AS_ADMIN)
    assert dead.status_code == 200
    assert {d["letter"] for d in dead.json()} == {letter_id} and len(dead.json()) == 6
    assert all(d["lastError"].startswith("retries exhausted") for d in dead.json())
    assert client.get("/deliveries", params={"status": "dead-lettered"}, headers=AUDITOR_FREE).status_code == 403
    assert (
        client.get("/deliveries", params={"status": "lost"}, headers=AS_ADMIN).json()["resourceType"]
        == "OperationOutcome"
    )

    target = dead.json()[0]["messageHeader"]
    assert client.post(f"/deliveries/{target}/$replay", headers=AUDITOR_FREE).status_code == 403
    replayed = client.post(f"/deliveries/{target}/$replay", headers=AS_ADMIN)
    assert replayed.status_code == 200 and replayed.json()["status"] == "queued"
    again = client.post(f"/deliveries/{target}/$replay", headers=AS_ADMIN)
    assert again.status_code == 409 and again.json()["resourceType"] == "OperationOutcome"

    server = _restart_receiver(receiver.port, tmp_path / "rx.db", [worker.signer.key])
    try:
        worker.clock = lambda: datetime.now(UTC) + timedelta(hours=3)
        assert worker.run_once() == 1, "only the replayed delivery is due"
        states = {d.message_id: d.status for d in outbox.deliveries()}
        assert states.pop(target) == "acknowledged"
        assert set(states.values()) == {"dead-lettered"}, "the others stay dead until replayed"
        assert len(httpx.get(f"{receiver.url}/messages").json()) == 1
    finally:
        server.should_exit = True
    replays = [e for e in outbox.audit_events() if e["outcomeDesc"].startswith("replay requested")]
    assert [e["entity"][0]["what"]["reference"] for e in replays] == [f"MessageHeader/{target}"]


def test_an_asynchronous_acknowledgement_completes_a_sent_delivery(world: dict[str, Any]) -> None:
    client, outbox = world["client"], world["outbox"]
    _push(client)
    claimed = outbox.claim("test-worker", datetime.now(UTC), limit=2)
    for d in claimed:
        assert outbox.finish(d.message_id, "test-worker", "sent", datetime.now(UTC))
    first, second = (d.message_id for d in claimed)
    headers = {**AUDITOR_FREE, "Content-Type": "application/fhir+json"}

    ok = client.post("/$process-message", content=_response(first, "ok"), headers=headers)
    assert ok.status_code == 200, ok.text
    duplicate = client.post("/$process-message", content=_response(first, "ok"), headers=headers)
    assert duplicate.status_code == 409, "a repeated acknowledgement changes nothing"
    fatal = client.post("/$process-message", content=_response(second, "fatal-error"), headers=headers)
    assert fatal.status_code == 200
    unknown = client.post("/$process-message", content=_response(str(uuid.uuid4()), "ok"), headers=headers)
    assert unknown.status_code == 409 and unknown.json()["resourceType"] == "OperationOutcome"

    states = {d.message_id: d for d in outbox.deliveries()}
    assert states[first].status == "acknowledged" and states[first].acknowledged_at is not None
    assert states[second].status == "dead-lettered" and states[second].last_error == "receiver answered fatal-error"
    receipts = [e for e in outbox.audit_events() if e["outcomeDesc"].startswith("acknowledgement from")]
    assert [(e["entity"][0]["what"]["identifier"]["value"], e["outcome"]) for e in receipts] == [
        (f"urn:uuid:{first}", "0"),
        (f"urn:uuid:{second}", "8"),
    ]


def test_a_document_message_is_a_letter_and_junk_is_refused(world: dict[str, Any]) -> None:
    client, outbox = world["client"], world["outbox"]
    document = orjson.loads((FIXTURES / "fhir" / "document-s1.json").read_bytes())
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {"system": "urn:example", "code": "discharge-letter"},
        "source": {"endpoint": "https://his.example/fhir"},
        "focus": [{"reference": f"urn:uuid:{document['id']}"}],
    }
    message = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": datetime.now(UTC).isoformat(),
        "entry": [
            {"fullUrl": f"urn:uuid:{header['id']}", "resource": header},
            {"fullUrl": f"urn:uuid:{document['id']}", "resource": document},
        ],
    }
    headers = {**AUDITOR_FREE, "Content-Type": "application/fhir+json"}
    answer = client.post("/$process-message", content=orjson.dumps(message), headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["recipients"] >= 1
    assert client.post("/$process-message", content=orjson.dumps(message), headers=headers).status_code == 200

    refused_before = len([e for e in outbox.audit_events() if e["type"]["code"] == "110107"])
    for body, status in (
        (b"{not json", 400),
        (orjson.dumps({"resourceType": "Bundle", "type": "collection"}), 400),
        (orjson.dumps({**message, "entry": message["entry"][:1]}), 422),
    ):
        refused = client.post("/$process-message", content=body, headers=headers)
        assert refused.status_code == status, refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"
    assert client.post("/$process-message", content=orjson.dumps(message)).status_code == 401
    refused_after = len([e for e in outbox.audit_events() if e["type"]["code"] == "110107"])
    assert refused_after == refused_before + 3


def _page_through(client: TestClient, query: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Every delivery the listing gives, following its Link headers; (deliveries, pages)."""
    seen: list[dict[str, Any]] = []
    answer = client.get("/deliveries", params=query, headers=AS_ADMIN)
    pages = 1
    while True:
        assert answer.status_code == 200, answer.text
        seen += answer.json()
        link = answer.headers.get("link")
        if link is None:
            return seen, pages
        assert link.endswith('>; rel="next"'), link
        answer = client.get(link[1 : -len('>; rel="next"')], headers=AS_ADMIN)
        pages += 1
        assert pages < 100, "the Link header loops"


def test_the_delivery_listing_pages_through_every_delivery_once_in_order(world: dict[str, Any]) -> None:
    """``GET /deliveries`` answers a page (``_count``, 100 by default) and links the next one; followed to
    the end, the pages hold each delivery exactly once, in the order they last changed — ties (one
    letter's deliveries change at the same instant) broken by message id, so none is skipped."""
    client, outbox = world["client"], world["outbox"]
    start = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    for n in range(23):  # 69 deliveries; each letter's 3 share their timestamps
        outbox.accept(
            document_key=f"urn:oid:1.2.3|paging-{n}",
            set_key=None,
            version=None,
            client="his",
            media_type="application/hl7-cda+xml",
            body=b"<ClinicalDocument/>",
            deliveries=[(f"m-{n:02d}-{r}", f"r-{r}", f"Organization/r-{r}", "http://127.0.0.1:9/") for r in "cab"],
            audit_events=[],
            now=start + timedelta(seconds=n % 7),  # not in insertion order either
        )
    every, pages = _page_through(client, {"status": "queued", "_count": 10})
    assert pages == 7
    ids = [d["messageHeader"] for d in every]
    assert sorted(ids) == sorted(f"m-{n:02d}-{r}" for n in range(23) for r in "abc")
    assert [(d["updated"], d["messageHeader"]) for d in every] == sorted(
        (d["updated"], d["messageHeader"]) for d in every
    )
    assert _page_through(client, {"status": "queued", "_count": 69})[1] == 1  # exactly full: no empty last page
    first = client.get("/deliveries", params={"status": "queued"}, headers=AS_ADMIN)
    assert len(first.json()) == 69 and "link" not in first.headers  # the default page (100) holds them all
    assert [d["messageHeader"] for d in _page_through(client, {"_count": 50})[0]][:69] == ids
    assert _page_through(client, {"status": "acknowledged", "_count": 5}) == ([], 1)


def test_a_bad_page_size_or_a_forged_cursor_is_a_400_outcome(world: dict[str, Any]) -> None:
    client = world["client"]
    for query in (
        {"_count": "0"},
        {"_count": "1001"},
        {"_count": "ten"},
        {"_cursor": "not-a-cursor"},
        {"_cursor": "WyJ5ZXN0ZXJkYXkiLCJtIl0"},  # ["yesterday","m"]: JSON, but no timestamp
        {"_cursor": "WyIyMDI2LTExLTI0VDA4OjAwOjAwIiwibSJd"},  # a timestamp without its zone
        {"_cursor": "WzEsMiwzXQ"},  # [1,2,3]
    ):
        answer = client.get("/deliveries", params={"status": "queued", **query}, headers=AS_ADMIN)
        assert answer.status_code == 400, (query, answer.text)
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome", outcome
        assert outcome["issue"][0]["code"] == "value", outcome
