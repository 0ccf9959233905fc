"""The reference receiver: verifies the seal, answers ok, and never processes a message twice."""

from __future__ import annotations

import copy
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.receiver import create_receiver
from gateway.seal import Signer, generate_key, sign
from tests.dispatch_cases import run

SIGNER = Signer(generate_key())


def _client(tmp_path: Path) -> TestClient:
    return TestClient(create_receiver(f"sqlite:///{tmp_path / 'rx.db'}", [SIGNER.key]))


def _sealed() -> dict:  # type: ignore[type-arg]
    return sign(copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"]), SIGNER, "2026-10-30T11:30:00+01:00")


def test_accepts_a_sealed_message_and_answers_ok(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        message = _sealed()
        answer = client.post("/$process-message", json=message)
        assert answer.status_code == 200
        header = answer.json()["entry"][0]["resource"]
        assert header["response"] == {"identifier": message["entry"][0]["resource"]["id"], "code": "ok"}


def test_a_resent_message_gets_the_original_answer_and_is_stored_once(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        message = _sealed()
        first = client.post("/$process-message", json=message).json()
        again = client.post("/$process-message", json=message).json()
        assert first == again
        assert len(client.get("/messages").json()) == 1


def test_refuses_unsealed_altered_or_malformed_messages(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        message = _sealed()
        unsealed = {k: v for k, v in message.items() if k != "signature"}
        altered = copy.deepcopy(message)
        altered["entry"][1]["resource"]["status"] = "entered-in-error"
        for body in (unsealed, altered, {"resourceType": "Bundle", "type": "collection"}):
            answer = client.post("/$process-message", json=body)
            assert answer.status_code == 400
            assert answer.json()["resourceType"] == "OperationOutcome"
        assert client.post("/$process-message", content=b"{nope").status_code == 400
        assert client.get("/messages").json() == []


def test_an_oversize_message_is_refused_before_it_is_read(tmp_path: Path) -> None:
    client = TestClient(create_receiver(f"sqlite:///{tmp_path / 'rx.db'}", [SIGNER.key], max_bytes=1024))
    answer = client.post(
        "/fhir/ep/$process-message",
        content=b"{" + b" " * 4096 + b"}",
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 413
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert answer.json()["issue"][0]["code"] == "too-long"
