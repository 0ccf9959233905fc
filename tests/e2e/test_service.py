"""The service end to end on loopback: POST /letters → outbox → worker → real receiver → acknowledged.

A real uvicorn receiver runs in a thread; the gateway app is driven through its HTTP interface; the
delivery worker runs one pass at a time so the test is deterministic.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.deliver import Deliverer, RetryPolicy
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.receiver import create_receiver
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from gateway.transports.http import HttpTransport
from tests.conftest import FIXTURES, mappings

HIS = "his-key-0123456789abcdef0000"
ADMIN = "admin-key-0123456789abcdef"
DISPATCH = FIXTURES / "dispatch"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver:
    def __init__(self, db: Path, signer: Signer) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_receiver(f"sqlite:///{db}", [signer.key]), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        for _ in range(100):
            try:
                httpx.get(f"{self.url}/messages", timeout=0.5)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("receiver did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    def messages(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/messages").json())


@contextmanager
def running_service(
    tmp_path: Path, database_url: str, consents: Sequence[str] = ("consents-s1.json",)
) -> Iterator[dict[str, Any]]:
    """A gateway (API, outbox, worker) over the sample directory and ``consents``, delivering to a real
    reference receiver on loopback."""
    signer = Signer(generate_key())
    receiver = Receiver(tmp_path / "rx.db", signer)
    receiver.start()
    engine = make_engine(database_url)
    store = ResourceStore(engine=engine)
    outbox = Outbox(engine, signer)
    seed_store(store, lambda ep: f"{receiver.url}/fhir/{ep}", consents)
    settings = Settings(api_keys={HIS: frozenset({"his"}), ADMIN: frozenset({"admin"})})
    app = create_app(settings, store, outbox, mappings())
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=signer,
        transports={"http": HttpTransport(timeout=2.0)},
        retry=RetryPolicy(max_attempts=3, initial=5.0),
    )
    with TestClient(app) as client:
        yield {"client": client, "outbox": outbox, "worker": worker, "receiver": receiver, "engine": engine}
    worker.close()
    receiver.stop()
    engine.dispose()


@pytest.fixture
def world(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    with running_service(tmp_path, database_url) as service:
        yield service


def _push(client: TestClient, path: Path) -> Any:
    return client.post(
        "/letters",
        content=path.read_bytes(),
        headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
    )


def test_letter_is_accepted_stored_delivered_and_acknowledged(world: dict[str, Any]) -> None:
    client, worker, receiver = world["client"], world["worker"], world["receiver"]
    answer = _push(client, DISPATCH / "ldl-ses-s1-pharmacy.xml")
    assert answer.status_code == 202, answer.text
    letter_id = answer.json()["letterId"]
    assert answer.headers["Location"] == f"/letters/{letter_id}"
    again = _push(client, DISPATCH / "ldl-ses-s1-pharmacy.xml")
    assert again.status_code == 200 and again.json()["letterId"] == letter_id and again.json()["duplicate"]
    status = client.get(f"/letters/{letter_id}", headers={"Authorization": f"Bearer {HIS}"}).json()
    assert {d["status"] for d in status["deliveries"]} == {"queued"}
    assert worker.run_once() == 6
    status = client.get(f"/letters/{letter_id}", headers={"Authorization": f"Bearer {HIS}"}).json()
    assert {d["recipient"]: (d["status"], d["lastError"]) for d in status["deliveries"]} == {
        d["recipient"]: ("acknowledged", None) for d in status["deliveries"]
    }
    assert len(receiver.messages()) == 6
    assert worker.run_once() == 0, "nothing left to send: no duplicate delivery"


def test_an_outage_is_retried_without_a_hot_loop_then_dead_lettered(world: dict[str, Any]) -> None:
    client, worker, outbox, receiver = world["client"], world["worker"], world["outbox"], world["receiver"]
    receiver.stop()
    letter_id = _push(client, DISPATCH / "ldl-ses-s1-pharmacy.xml").json()["letterId"]
    assert worker.run_once() == 6
    assert {d.status for d in outbox.deliveries()} == {"failed-retrying"}
    assert worker.run_once() == 0, "not due yet: no hot loop"
    later = datetime.now(UTC) + timedelta(hours=1)
    worker.clock = lambda: later
    worker.run_once()
    worker.clock = lambda: later + timedelta(hours=1)
    worker.run_once()
    assert {d.status for d in outbox.deliveries()} == {"dead-lettered"}
    assert all("retries exhausted" in (d.last_error or "") for d in outbox.deliveries())
    status = client.get(f"/letters/{letter_id}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert {d["attempts"] for d in status["deliveries"]} == {3}


def test_bad_input_over_http_is_a_4xx_outcome_and_audited(world: dict[str, Any]) -> None:
    client, outbox = world["client"], world["outbox"]
    for name, ctype, status in (
        ("xxe-file.xml", "application/hl7-cda+xml", 400),
        ("malformed.xml", "application/hl7-cda+xml", 400),
        ("no-patient-identity.xml", "application/hl7-cda+xml", 422),
        ("malformed.xml", "text/plain", 415),
    ):
        answer = client.post(
            "/letters",
            content=(FIXTURES / "cda" / "bad" / name).read_bytes(),
            headers={"Authorization": f"Bearer {HIS}", "Content-Type": ctype},
        )
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
    refusals = [e for e in outbox.audit_events() if e["type"]["code"] == "110107"]
    assert len(refusals) == 4
    assert client.post("/letters", content=b"<x/>", headers={"Content-Type": "text/xml"}).status_code == 401
