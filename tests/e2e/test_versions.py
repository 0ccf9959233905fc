"""A new version of a letter (same setId, higher versionNumber) replaces the earlier one, never adds to it.

- what of the earlier version already left is *replaced*: the new message names it (MessageHeader
  extension ``replaces-message``) so the receiver swaps rather than duplicates;
- what of the earlier version had not left yet is withheld ("superseded"), so nobody gets both;
- an older version that arrives after a newer one is stored but never sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from gateway import invariants, validate
from gateway.package import EXT_REPLACES
from tests.e2e.test_service import DISPATCH, HIS, world

__all__ = ["world"]  # the fixture, re-exported for pytest

V1 = (DISPATCH / "ldl-ses-s1-pharmacy.xml").read_bytes()


def _version(n: int) -> bytes:
    return V1.replace(
        b'extension="LDL-SES-20261030-000458"/>', f'extension="LDL-SES-20261030-000458-V{n}"/>'.encode()
    ).replace(b'<versionNumber value="1"/>', f'<versionNumber value="{n}"/>'.encode())


def _push(client: TestClient, body: bytes) -> str:
    answer = client.post(
        "/letters", content=body, headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["letterId"])


def _status(client: TestClient, letter_id: str) -> dict[str, Any]:
    return dict(client.get(f"/letters/{letter_id}", headers={"Authorization": f"Bearer {HIS}"}).json())


def _received_headers(tmp_path: Path) -> dict[str, dict[str, Any]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'rx.db'}")
    with engine.connect() as conn:
        bodies = [orjson.loads(r.body) for r in conn.execute(text("SELECT body FROM received_message"))]
    engine.dispose()
    return {b["entry"][0]["resource"]["id"]: b["entry"][0]["resource"] for b in bodies}


def test_a_new_version_replaces_what_was_delivered(world: dict[str, Any], tmp_path: Path) -> None:
    client, worker = world["client"], world["worker"]
    first = _push(client, V1)
    assert worker.run_once() == 6
    earlier = {d["recipient"]: d["messageHeader"] for d in _status(client, first)["deliveries"]}
    second = _push(client, _version(2))
    status = _status(client, second)
    assert status["replaces"] == first
    assert {d["recipient"]: d["replaces"] for d in status["deliveries"]} == earlier
    assert worker.run_once() == 6
    received = _received_headers(tmp_path)
    assert len(received) == 12, "six originals and six replacements: nothing dropped, nothing doubled"
    for d in _status(client, second)["deliveries"]:
        assert d["status"] == "acknowledged"
        header = received[d["messageHeader"]]
        assert header["extension"] == [{"url": EXT_REPLACES, "valueId": earlier[d["recipient"]]}]
        assert d["messageHeader"] != earlier[d["recipient"]]
    for d in _status(client, first)["deliveries"]:
        assert d["status"] == "acknowledged", "what was delivered stays recorded as delivered"


def test_a_version_that_never_left_is_superseded_not_sent(world: dict[str, Any], tmp_path: Path) -> None:
    client, worker = world["client"], world["worker"]
    first = _push(client, V1)
    second = _push(client, _version(2))
    assert {(d["status"], d["lastError"]) for d in _status(client, first)["deliveries"]} == {
        ("withheld", "superseded by version 2 before it left")
    }
    assert {d["replaces"] for d in _status(client, second)["deliveries"]} == {None}, "nothing to replace"
    assert worker.run_once() == 6
    received = _received_headers(tmp_path)
    assert len(received) == 6
    assert all("extension" not in h for h in received.values())


def test_an_older_version_arriving_late_is_stored_but_never_sent(world: dict[str, Any], tmp_path: Path) -> None:
    client, worker = world["client"], world["worker"]
    _push(client, _version(3))
    assert worker.run_once() == 6
    late = _push(client, _version(2))
    assert {(d["status"], d["lastError"]) for d in _status(client, late)["deliveries"]} == {
        ("withheld", "superseded: version 3 of this letter was received first")
    }
    assert worker.run_once() == 0
    assert len(_received_headers(tmp_path)) == 6


PHARMACIST = b"<!-- Destinataire 3 : pharmacien d'officine"


def _without_pharmacist(body: bytes) -> bytes:
    """The letter without its third intended recipient (the pharmacist): a correction of the list."""
    start = body.index(PHARMACIST)
    end = body.index(b"</informationRecipient>\n\n", body.index(b"<informationRecipient>", start)) + len(
        b"</informationRecipient>"
    )
    return body[:start] + body[end:]


def test_a_recipient_the_new_version_drops_is_told_to_set_the_earlier_one_aside(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """The pharmacist got version 1; version 2 is no longer addressed to him: he receives a withdrawal
    notice naming the message to set aside — and nothing about the patient."""
    client, worker = world["client"], world["worker"]
    first = _push(client, V1)
    assert worker.run_once() == 6
    earlier = {d["recipient"]: d["messageHeader"] for d in _status(client, first)["deliveries"]}
    second = _push(client, _without_pharmacist(_version(2)))
    deliveries = {d["recipient"]: d for d in _status(client, second)["deliveries"]}
    withdrawals = [r for r, d in deliveries.items() if d["kind"] == "withdrawal"]
    assert len(withdrawals) == 1 and len(deliveries) == 6, deliveries
    [dropped] = withdrawals
    assert deliveries[dropped]["replaces"] == earlier[dropped]
    assert worker.run_once() == 6
    assert {d["status"] for d in _status(client, second)["deliveries"]} == {"acknowledged"}

    engine = create_engine(f"sqlite:///{tmp_path / 'rx.db'}")
    with engine.connect() as conn:
        bodies = {
            orjson.loads(r.body)["entry"][0]["resource"]["id"]: r.body
            for r in conn.execute(text("SELECT body FROM received_message"))
        }
    engine.dispose()
    notice = orjson.loads(bodies[deliveries[dropped]["messageHeader"]])
    header = notice["entry"][0]["resource"]
    assert header["eventCoding"]["code"] == "discharge-withdrawal"
    assert header["extension"] == [{"url": EXT_REPLACES, "valueId": earlier[dropped]}]
    assert [e["resource"]["resourceType"] for e in notice["entry"]] == ["MessageHeader", "Communication"]
    assert not [p for e in notice["entry"] for p in validate.check_with_models(e["resource"])], "valid FHIR R4"
    assert not invariants.violations(notice)
    original = orjson.loads(bodies[earlier[dropped]])
    patient = next(e["resource"] for e in original["entry"] if e["resource"]["resourceType"] == "Patient")
    raw = bodies[deliveries[dropped]["messageHeader"]]
    for value in [i["value"] for i in patient["identifier"]] + [n["family"] for n in patient["name"]]:
        assert value not in raw, f"the withdrawal notice carries the patient's {value!r}"
    assert patient["birthDate"] not in raw
