"""The letter routes (``POST /letters``, ``POST /$process-message``) check the caller in their body and are
served by Starlette's plain request wrapper (gateway.api.app._letters): pinned here to the same answers,
audit records and request log line as when FastAPI's own request handler serves them, refusals included,
and to an OpenAPI document that still describes them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, request_response
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.auditlog import Filters
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES, mappings

HIS = "his-key-0123456789abcdef0000"
AUDITOR = "auditor-key-0123456789abcdef"
S6 = (FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml").read_bytes()
HOT = ("/letters", "/$process-message")


def _gateway(db: Path, fastapi_handler: bool) -> tuple[FastAPI, Outbox]:
    engine = make_engine(f"sqlite:///{db}")
    store = ResourceStore(engine=engine)
    seed_store(store, lambda ep: f"http://127.0.0.1:9/fhir/{ep}", consents=())
    outbox = Outbox(engine, Signer(generate_key()))
    settings = Settings(api_keys={HIS: frozenset({"his"}), AUDITOR: frozenset({"auditor"})}, max_document_bytes=200_000)
    app = create_app(settings, store, outbox, mappings())
    if fastapi_handler:  # the hot routes as FastAPI serves any other route
        for route in app.routes:
            if isinstance(route, APIRoute) and route.path in HOT:
                route.app = request_response(route.get_route_handler())
    return app, outbox


def _document_message(document_id: str) -> bytes:
    document = {
        "resourceType": "Bundle",
        "id": document_id,
        "type": "document",
        "entry": [{"fullUrl": "urn:uuid:0", "resource": {"resourceType": "Composition", "id": "c"}}],
    }
    header = {"resourceType": "MessageHeader", "id": "h", "focus": [{"reference": f"Bundle/{document_id}"}]}
    message = {"resourceType": "Bundle", "type": "message", "entry": [{"resource": header}, {"resource": document}]}
    return orjson.dumps(message)


def _letter(tag: str) -> bytes:
    start = S6.index(b"<id ", S6.index(b"<ClinicalDocument"))
    end = S6.index(b"/>", start) + 2
    return S6[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="FAST-{tag}"/>'.encode() + S6[end:]


CDA = {"Content-Type": "application/hl7-cda+xml"}
CALLS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("no key", "/letters", CDA, _letter("a")),
    ("wrong key", "/letters", {**CDA, "X-API-Key": "wrong-key-0123456789abcdef"}, _letter("a")),
    ("no role", "/letters", {**CDA, "Authorization": f"Bearer {AUDITOR}"}, _letter("a")),
    ("content type", "/letters", {"Content-Type": "text/plain", "X-API-Key": HIS}, _letter("a")),
    ("oversize", "/letters", {**CDA, "X-API-Key": HIS}, b"<a>" + b" " * 200_001 + b"</a>"),
    ("malformed", "/letters", {**CDA, "X-API-Key": HIS}, b"<ClinicalDocument"),
    ("xxe", "/letters", {**CDA, "X-API-Key": HIS}, b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>'),
    ("accepted", "/letters", {**CDA, "X-API-Key": HIS}, _letter("a")),
    ("again", "/letters", {**CDA, "X-API-Key": HIS}, _letter("a")),
    ("message no key", "/$process-message", {"Content-Type": "application/fhir+json"}, b"{}"),
    ("message malformed", "/$process-message", {"X-API-Key": HIS}, b"{not json"),
    ("message not a bundle", "/$process-message", {"X-API-Key": HIS}, b'{"resourceType": "Patient"}'),
    ("message auditor", "/$process-message", {"X-API-Key": AUDITOR}, _document_message("d1")),
    ("message unknown ack", "/$process-message", {"X-API-Key": AUDITOR},
     orjson.dumps({"resourceType": "Bundle", "type": "message", "entry": [{"resource": {
         "resourceType": "MessageHeader", "id": "r", "response": {"identifier": "nope", "code": "ok"}}}]})),
]  # fmt: skip

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _answers(app: FastAPI) -> list[tuple[str, int, dict[str, str], bytes]]:
    with TestClient(app) as client:
        out = []
        for name, path, headers, body in CALLS:
            answer = client.post(path, content=body, headers=headers)
            kept = {k: v for k, v in answer.headers.items() if k in ("content-type", "location", "www-authenticate")}
            kept = {k: _UUID.sub(b"<id>", v.encode()).decode() for k, v in kept.items()}
            out.append((name, answer.status_code, kept, _UUID.sub(b"<id>", answer.content)))
        return out


_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[^ ]*")


def _audit(outbox: Outbox) -> list[tuple[str | None, str | None, str]]:
    _total, records = outbox.log.search(Filters(), offset=0, count=500)
    return [(r.kind, r.outcome, _STAMP.sub("<at>", str(r.event.get("outcomeDesc", "")))) for r in records]


@pytest.fixture
def both(tmp_path: Path) -> Iterator[dict[str, Any]]:
    plain, plain_outbox = _gateway(tmp_path / "plain.db", fastapi_handler=True)
    fast, fast_outbox = _gateway(tmp_path / "fast.db", fastapi_handler=False)
    yield {"plain": (plain, plain_outbox), "fast": (fast, fast_outbox)}
    for outbox in (plain_outbox, fast_outbox):
        outbox.engine.dispose()


def test_the_letter_routes_answer_and_audit_as_fastapi_would(both: dict[str, Any]) -> None:
    plain, fast = _answers(both["plain"][0]), _answers(both["fast"][0])
    assert fast == plain
    statuses = {name: status for name, status, _h, _b in fast}
    assert statuses == {
        "no key": 401,
        "wrong key": 401,
        "no role": 403,
        "content type": 415,
        "oversize": 413,
        "malformed": 400,
        "xxe": 400,
        "accepted": 202,
        "again": 200,
        "message no key": 401,
        "message malformed": 400,
        "message not a bundle": 400,
        "message auditor": 403,
        "message unknown ack": 409,
    }
    for name, status, headers, body in fast:
        if status >= 400:
            assert headers["content-type"] == "application/fhir+json", name
            assert orjson.loads(body)["resourceType"] == "OperationOutcome", name
    assert _audit(both["fast"][1]) == _audit(both["plain"][1])
    descs = [d for _k, outcome, d in _audit(both["fast"][1]) if outcome == "4"]
    assert "refused: POST /letters needs the role his or admin" in descs  # the 403, audited as before
    assert any(d.startswith("refused (not-supported): content type 'text/plain'") for d in descs)
    assert any("pushing a letter needs the role his or admin" in d for d in descs)
    client = "client-" + hashlib.sha256(HIS.encode()).hexdigest()[:12]
    auditor = "client-" + hashlib.sha256(AUDITOR.encode()).hexdigest()[:12]
    refusals = [r.event for r in both["fast"][1].log.search(Filters(kind="receive"), offset=0, count=500)[1]]
    assert refusals and {e["agent"][0]["who"]["display"] for e in refusals} == {client, auditor}


def test_the_request_log_line_of_a_letter_is_unchanged(both: dict[str, Any], json_logs: Any) -> None:
    with TestClient(both["fast"][0]) as client:
        assert client.post("/letters", content=_letter("log"), headers={**CDA, "X-API-Key": HIS}).status_code == 202
        assert client.post("/letters", content=b"<x/>", headers=CDA).status_code == 401
    lines = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    access = [line for line in lines if line.get("logger") == "gateway.access"]
    assert [(a["method"], a["route"], a["status"], a["client"]) for a in access] == [
        ("POST", "/letters", 202, "client-" + hashlib.sha256(HIS.encode()).hexdigest()[:12]),
        ("POST", "/letters", 401, None),
    ]
    assert all(re.fullmatch(r"[0-9a-f]{16}", a["request_id"]) for a in access)


def test_the_openapi_document_still_describes_the_letter_routes(both: dict[str, Any]) -> None:
    with TestClient(both["fast"][0]) as fast, TestClient(both["plain"][0]) as plain:
        document = fast.get("/openapi.json").json()
        assert document == plain.get("/openapi.json").json()
    assert set(document["paths"]["/letters"]["post"]["responses"]) >= {"202", "4XX", "500"}
    assert "requestBody" in document["paths"]["/letters"]["post"]
    assert "post" in document["paths"]["/$process-message"]


def test_no_request_looks_for_opentelemetry_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI's telemetry is off in the gateway's app: no per-request look-up of providers nobody set."""
    from fastapi.telemetry import _asgi

    looked: list[str] = []
    monkeypatch.setattr(_asgi, "_unconfigured", lambda provider: looked.append(type(provider).__name__) or True)
    app, _outbox = _gateway(tmp_path / "gateway.db", fastapi_handler=False)
    with TestClient(app) as client:
        assert client.post("/letters", content=_letter("otel"), headers={**CDA, "X-API-Key": HIS}).status_code == 202
        assert client.get("/healthz").status_code == 200
    assert looked == []
    with TestClient(FastAPI()) as default:  # what the gateway turned off: FastAPI's check on every request
        default.get("/")
    assert looked
