"""Observability end to end: /metrics, /readyz and the JSON logs of a real run (POST /letters → outbox →
worker → receiver), and that no patient data reaches the logs.

The S6 letter (a patient who objects to sharing with social actors) goes through the app and the delivery
worker with a real receiver on loopback (tests/e2e/test_service.py's); /metrics is parsed with
prometheus_client's own parser and compared with the database; every captured log line must be JSON,
carry the ids, and hold none of the patient's identifiers, names, birth date or letter content.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import Engine

from gateway import logs
from gateway.api.app import create_app
from gateway.api.ops import Readiness
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_service import ADMIN, DISPATCH, HIS, running_service

LETTER = DISPATCH / "ldl-ses-s6-objection.xml"
INS = "248057511410235"
# what of the S6 patient must never be logged: identifiers, names, birth date, and some letter content
PATIENT_DATA = (
    INS,
    "IPP0004532718",
    "ROUX",
    "ARNAUD",
    "COLETTE",
    "19480517",
    "1948-05-17",
    "SERTRALINE",
    "hyponatr",
    "patient=",  # a query string (the Consent search below)
    "identifier=",  # a query string (the patient report below)
    "1.2.250.1.213.1.4.10|",  # the INS system of a search value, i.e. a query string
)


def _leaks(captured: str) -> list[str]:
    lowered = captured.lower()
    return [needle for needle in PATIENT_DATA if needle.lower() in lowered]


@pytest.fixture
def s6(tmp_path: Path, database_url: str, json_logs: io.StringIO) -> Iterator[dict[str, Any]]:
    with running_service(tmp_path, database_url, ["consents-s6.json"]) as service:
        yield {**service, "logs": json_logs}


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, labels), parsed by prometheus_client's parser."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _by_status(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, int]:
    return {dict(labels)["status"]: int(v) for (name, labels), v in samples.items() if name == "gateway_messages" and v}


def _push(client: TestClient, body: bytes) -> Any:
    headers = {"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}
    return client.post("/letters", content=body, headers=headers)


def test_a_letter_moves_the_metrics_and_the_logs_carry_ids_but_no_patient_data(s6: dict[str, Any]) -> None:
    client, outbox, worker = s6["client"], s6["outbox"], s6["worker"]
    before = _scrape(client)
    assert _value(before, "gateway_letters_accepted_total", source="http") == 0
    assert _value(before, "gateway_database_up") == 1

    answer = _push(client, LETTER.read_bytes())
    assert answer.status_code == 202, answer.text
    letter_id = answer.json()["letterId"]
    queued = _scrape(client)
    assert _value(queued, "gateway_letters_accepted_total", source="http") == 1
    in_db = Counter(d.status for d in outbox.deliveries())
    assert _by_status(queued) == dict(in_db) and in_db["queued"] >= 1
    assert _value(queued, "gateway_queue_depth") == in_db["queued"]

    assert worker.run_once() == sum(in_db.values())
    delivered = _scrape(client)
    in_db = Counter(d.status for d in outbox.deliveries())
    assert _by_status(delivered) == dict(in_db)
    handed_over = in_db["acknowledged"] + in_db["sent"]
    assert handed_over >= 1, in_db
    assert _value(delivered, "gateway_delivery_latency_seconds_count") == handed_over
    assert _value(delivered, "gateway_delivery_latency_seconds_bucket", le="+Inf") == handed_over
    assert 0 < _value(delivered, "gateway_delivery_latency_seconds_sum") < 60
    assert _value(delivered, "gateway_queue_depth") == 0
    assert _value(delivered, "gateway_delivery_attempts_total", outcome="acknowledged") == in_db["acknowledged"]
    assert _value(delivered, "gateway_dead_letters_total") == 0

    bad = _push(client, (FIXTURES / "cda" / "bad" / "malformed.xml").read_bytes())
    assert bad.status_code == 400
    reason = bad.json()["issue"][0]["code"]
    refused = _scrape(client)
    assert _value(refused, "gateway_letters_refused_total", reason=reason) == 1
    assert _value(refused, "gateway_letters_accepted_total", source="http") == 1

    # reads whose query strings carry the patient's INS, and a status read naming the letter
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert client.get(f"/Consent?patient=urn:oid:1.2.250.1.213.1.4.10|{INS}", headers=admin).status_code == 200
    report = client.get(f"/Patient/$audit-report?identifier=urn:oid:1.2.250.1.213.1.4.10|{INS}", headers=admin)
    assert report.status_code == 200
    assert client.get(f"/letters/{letter_id}", headers=admin).status_code == 200

    captured = s6["logs"].getvalue()
    lines = [orjson.loads(line) for line in captured.splitlines()]  # every line is one JSON object
    assert lines and all({"timestamp", "level", "logger", "event"} <= set(line) for line in lines)
    assert all(line["timestamp"].endswith("Z") for line in lines)
    accepted = [line for line in lines if line["event"] == "letter accepted"]
    assert [line["letter_id"] for line in accepted] == [letter_id]
    attempts = [line for line in lines if line["event"] == "delivery attempt"]
    assert {(a["message_id"], a["recipient"], a["outcome"]) for a in attempts} == {
        (d.message_id, d.recipient_id, d.status) for d in outbox.deliveries()
    }
    assert all(a["letter_id"] == letter_id and a["attempt"] == 1 for a in attempts)
    assert [line["reason"] for line in lines if line["event"] == "letter refused"] == [reason]
    requests = [line for line in lines if line["event"] == "request"]
    assert {"/letters", "/Consent", "/Patient/$audit-report", "/letters/{letter_id}"} <= {r["route"] for r in requests}
    assert [r["letter_id"] for r in requests if r["route"] == "/letters/{letter_id}"] == [letter_id]
    assert all(r["client"] and r["client"].startswith("client-") for r in requests)
    assert _leaks(captured) == [], "patient data in the logs"

    # the check above can fail: a careless line through the same pipeline is caught
    logs.get_logger("gateway.test").warning("careless: letter of ROUX COLETTE")
    assert _leaks(s6["logs"].getvalue()) == ["ROUX", "COLETTE"]


def test_retries_and_dead_letters_are_counted(s6: dict[str, Any]) -> None:
    client, worker = s6["client"], s6["worker"]
    worker.transports["http"] = _Refusing()
    assert _push(client, LETTER.read_bytes()).status_code == 202
    assert worker.run_once() >= 2
    sent = len(s6["outbox"].deliveries("failed-retrying"))  # the objection withholds the CLIC's message
    assert sent >= 1
    samples = _scrape(client)
    assert _value(samples, "gateway_delivery_retries_total") == sent
    assert _value(samples, "gateway_messages", status="failed-retrying") == sent
    assert _value(samples, "gateway_queue_depth") == 0, "not due yet"
    lines = [orjson.loads(line) for line in s6["logs"].getvalue().splitlines()]
    retrying = [line for line in lines if line["event"] == "delivery attempt" and line["outcome"] != "withheld"]
    assert {(r["outcome"], r["level"], r["error_kind"]) for r in retrying} == {
        ("failed-retrying", "warning", "HTTP 503")
    }
    assert all(r["retry_at"] for r in retrying)
    later = datetime.now(UTC) + timedelta(hours=1)
    worker.clock = lambda: later
    assert worker.run_once() == sent
    worker.clock = lambda: later + timedelta(hours=1)
    assert worker.run_once() == sent  # the third and last attempt (RetryPolicy(max_attempts=3))
    samples = _scrape(client)
    assert _value(samples, "gateway_delivery_retries_total") == 2 * sent
    assert _value(samples, "gateway_dead_letters_total") == sent
    assert _value(samples, "gateway_messages", status="dead-lettered") == sent
    assert _value(samples, "gateway_delivery_latency_seconds_count") == 0, "nothing was handed over"
    assert _leaks(s6["logs"].getvalue()) == [], "the receiver's answer quoted the INS: only its kind is logged"


class _Refusing:
    """A transport whose receiver is overloaded (HTTP 503, retried)."""

    def send(self, body: bytes, address: str, message_id: str, content_type: str = "") -> Any:
        from gateway.transports import Outcome

        return Outcome("transient", "HTTP 503: <html>busy for patient 248057511410235</html>")

    def close(self) -> None:
        pass


# -- /readyz --------------------------------------------------------------------------------------------


def _app(engine: Engine, signer: Signer | None) -> TestClient:
    store = ResourceStore(engine=engine)
    settings = Settings(api_keys={HIS: frozenset({"his"})})
    return TestClient(create_app(settings, store, Outbox(engine, signer), mappings()))


def test_readyz_names_what_is_missing(tmp_path: Path) -> None:
    home = tmp_path / "db"
    home.mkdir()
    engine = make_engine(f"sqlite:///{home / 'gateway.db'}")
    ready = _app(engine, Signer(generate_key()))
    answer = ready.get("/readyz")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": "ready",
        "checks": {"database": "ok", "schema": "ok", "mappings": "ok", "signing_key": "ok"},
    }
    assert ready.get("/healthz").json() == {"status": "ok"}

    no_key = _app(engine, None).get("/readyz")
    assert no_key.status_code == 503 and no_key.json()["failing"] == ["signing_key"]

    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    behind = ready.get("/readyz")
    assert behind.status_code == 503 and behind.json()["failing"] == ["schema"]
    assert "expected" in behind.json()["checks"]["schema"]

    home.rename(tmp_path / "gone")  # the database's volume went away
    engine.dispose()
    gone = ready.get("/readyz")
    assert gone.status_code == 503, gone.text
    assert gone.json()["failing"] == ["database", "schema"]
    assert gone.json()["checks"]["database"] == "unreachable (OperationalError)"
    assert ready.get("/healthz").status_code == 200, "liveness does not depend on the database"
    samples = _scrape(ready)
    assert _value(samples, "gateway_database_up") == 0
    engine.dispose()


def test_a_database_that_does_not_answer_is_not_waited_for() -> None:
    class Hanging:
        def connect(self) -> Any:
            time.sleep(1.0)
            raise RuntimeError("never reached in time")

    readiness = Readiness(cast(Engine, Hanging()), mappings(), Signer(generate_key()), timeout=0.1)
    started = time.perf_counter()
    checks = readiness.checks()
    assert time.perf_counter() - started < 0.5
    assert checks["database"] == "no answer within 0.1 s"
    assert readiness.checks()["database"] == "no answer within 0.1 s", "the hung check is not started twice"


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    first = _app(make_engine(f"sqlite:///{tmp_path / 'a.db'}"), None)
    second = _app(make_engine(f"sqlite:///{tmp_path / 'b.db'}"), None)
    assert _push(first, (FIXTURES / "cda" / "bad" / "malformed.xml").read_bytes()).status_code == 400
    assert _value(_scrape(first), "gateway_letters_refused_total", reason="structure") == 1
    assert _value(_scrape(second), "gateway_letters_refused_total", reason="structure") == 0
