"""Every 401 — no key, a wrong key, an unknown client certificate, a refused login on the audit page — is a
FHIR OperationOutcome (the page: its login form) *and* an audited User Authentication event naming the
route template and the caller as far as known, never the key; a flood is coalesced into a bounded number
of records whose counts add up to the refusals, and counted in ``/metrics``."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from gateway.api import auth
from gateway.api.app import create_app
from gateway.api.logins import RefusedLogins
from gateway.auditlog import AuditLog, Filters, verify
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests import pki
from tests.conftest import mappings

HIS = "his-key-0123456789abcdef0000"
AUDITOR = "auditor-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef00"
CA = pki.ca()
KNOWN, STRANGER = pki.issue(CA, "his-client", client=True), pki.issue(CA, "stranger", client=True)


class _Tls:
    """The ASGI TLS extension uvicorn's TLS protocol adds (auth.TlsScopeH11Protocol), with a fixed peer."""

    def __init__(self, app: Any, der: bytes) -> None:
        self.app, self.chain = app, [ssl.DER_cert_to_PEM_cert(der)]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": self.chain, "client_cert_error": None}}}
        await self.app(scope, receive, send)


@pytest.fixture
def gateway(database_url: str) -> Iterator[dict[str, Any]]:
    signer = Signer(generate_key())
    engine = make_engine(database_url)
    store = ResourceStore(engine=engine)
    outbox = Outbox(engine, signer)
    settings = Settings(api_keys={HIS: frozenset({"his"}), AUDITOR: frozenset({"auditor"})})
    app = create_app(settings, store, outbox, mappings())
    auth.install(app, auth.ClientAuth("both", {auth.fingerprint(KNOWN.der): frozenset({"his"})}))
    yield {"app": app, "outbox": outbox, "signer": signer, "engine": engine}
    engine.dispose()


def _refusals(log: AuditLog) -> list[dict[str, Any]]:
    total, records = log.search(Filters(kind="110122"), offset=0, count=500)
    assert total == len(records)
    return [r.event for r in records]


def _count(event: dict[str, Any]) -> int:
    return int(next(d["valueString"] for d in event["entity"][0]["detail"] if d["type"] == "refusals"))


def _outcome_401(answer: Any) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    assert answer.headers["www-authenticate"] == "Bearer"
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"


def test_each_kind_of_401_is_an_outcome_and_an_audit_record(gateway: dict[str, Any]) -> None:
    with TestClient(gateway["app"]) as client:
        _outcome_401(client.get("/Consent", params={"patient": "urn:oid:1.2.250.1.213.1.4.8|SECRET-INS"}))
        _outcome_401(client.post("/letters", content=b"<x/>", headers={"X-API-Key": WRONG, "Content-Type": "text/xml"}))
    with TestClient(_Tls(gateway["app"], STRANGER.der)) as stranger:
        _outcome_401(stranger.get("/letters/some-letter"))
    with TestClient(_Tls(gateway["app"], KNOWN.der)) as known:  # a mapped certificate is let in: no record
        assert known.get("/letters/some-letter").status_code == 404
    with TestClient(gateway["app"]) as client:
        found = client.get("/AuditEvent", params={"subtype": "110122"}, headers={"X-API-Key": AUDITOR})
        assert found.status_code == 200, found.text
        events = [e["resource"] for e in found.json()["entry"]]
    assert [e["entity"][0]["what"]["display"] for e in events] == [
        "GET /Consent",
        "POST /letters",
        "GET /letters/{letter_id}",
    ]
    who = [e["agent"][0]["who"]["display"] for e in events]
    assert who == [
        "anonymous",
        "client-" + hashlib.sha256(WRONG.encode()).hexdigest()[:12],
        "cert-" + auth.fingerprint(STRANGER.der)[:16],
    ]
    for event, why in zip(events, ("authentication required", "API key is not valid", "not authorised"), strict=True):
        assert event["type"]["code"] == "110114" and event["outcome"] == "4", event
        assert why in event["outcomeDesc"] and _count(event) == 1
        assert event["agent"][0]["network"] == {"address": "testclient", "type": "2"}
    text = str(events)
    assert "SECRET-INS" not in text and WRONG not in text, "no query string, no key in the audit"
    assert verify(gateway["engine"], [gateway["signer"].key]).ok


def test_a_refused_audit_page_login_is_audited_the_same_way(gateway: dict[str, Any]) -> None:
    with TestClient(gateway["app"]) as client:
        answer = client.post("/audit/login", data={"key": HIS})  # a valid key, but not an auditor's
        assert answer.status_code == 401 and "login-error" in answer.text
        assert client.post("/audit/login", data={"key": ""}).status_code == 401
    events = _refusals(gateway["outbox"].log)
    assert [e["entity"][0]["what"]["display"] for e in events] == ["POST /audit/login"] * 2
    assert events[0]["agent"][0]["who"]["display"] == "client-" + hashlib.sha256(HIS.encode()).hexdigest()[:12]
    assert events[1]["agent"][0]["who"]["display"] == "anonymous"
    assert HIS not in str(events)


def test_an_audit_page_opened_with_a_stale_session_is_audited_a_first_visit_is_not(gateway: dict[str, Any]) -> None:
    from gateway.api.pages import SESSION_COOKIE

    with TestClient(gateway["app"]) as client:
        first = client.get("/audit", follow_redirects=False)  # no credentials yet: sent to the login form
        assert first.status_code == 303 and first.headers["location"] == "/audit/login"
        assert _refusals(gateway["outbox"].log) == []
        client.cookies.set(SESSION_COOKIE, WRONG)  # a session whose key was revoked, or a forged one
        stale = client.get("/audit", follow_redirects=False)
        assert stale.status_code == 303 and stale.headers["location"] == "/audit/login"
    events = _refusals(gateway["outbox"].log)
    assert [e["entity"][0]["what"]["display"] for e in events] == ["GET /audit"]
    assert events[0]["agent"][0]["who"]["display"] == "client-" + hashlib.sha256(WRONG.encode()).hexdigest()[:12]
    assert WRONG not in str(events)


def test_a_flood_of_bad_calls_is_coalesced_and_the_counts_add_up(gateway: dict[str, Any]) -> None:
    with TestClient(gateway["app"]) as client:
        for n in range(1000):
            headers = {"Authorization": f"Bearer {WRONG}"} if n % 2 else {}
            assert client.post("/letters", content=b"<x/>", headers=headers).status_code == 401
        metrics = client.get("/metrics").text
        assert 'gateway_auth_refused_total{reason="invalid-api-key"} 500.0' in metrics
        assert 'gateway_auth_refused_total{reason="no-credentials"} 500.0' in metrics
        assert len(_refusals(gateway["outbox"].log)) == 2, "one record per address and reason while the flood lasts"
    events = _refusals(gateway["outbox"].log)  # the rest written at shutdown
    assert len(events) == 4
    assert sum(_count(e) for e in events) == 1000
    assert sorted(_count(e) for e in events) == [1, 1, 499, 499]
    assert verify(gateway["engine"], [gateway["signer"].key]).ok


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _request(address: str) -> Request:
    route = type("Route", (), {"path": "/letters"})()
    return Request({"type": "http", "method": "POST", "path": "/letters", "headers": [], "client": (address, 1),
                    "route": route})  # fmt: skip


def test_windows_close_after_their_time_and_stay_bounded_in_number(gateway: dict[str, Any]) -> None:
    clock = _Clock()
    log = gateway["outbox"].log
    logins = RefusedLogins(log, window=60.0, max_keys=3, clock=clock)
    for _ in range(5):
        logins.refused(_request("10.0.0.1"), "no-credentials", "authentication required", None)
    assert [_count(e) for e in _refusals(log)] == [1]
    clock.now = 60.0  # the window has passed: the next refusal closes it (4 more) and opens another
    logins.refused(_request("10.0.0.1"), "no-credentials", "authentication required", None)
    assert [_count(e) for e in _refusals(log)] == [1, 4, 1]
    assert "4 more refusal(s) from 10.0.0.1 (no-credentials)" in _refusals(log)[1]["outcomeDesc"]
    for n in range(2, 12):  # ten more addresses, three windows at most: the others share a fourth
        for _ in range(3):
            logins.refused(_request(f"10.0.0.{n}"), "no-credentials", "authentication required", None)
    assert list(logins._open) == [(f"10.0.0.{n}", "no-credentials") for n in (1, 2, 3)] + [("*", "no-credentials")]
    logins.flush()
    events = _refusals(log)
    assert sum(_count(e) for e in events) == 6 + 30
    assert len(events) == 3 + 2 * 3  # the first of each window, then what each stood for
    assert "from many addresses" in events[-1]["outcomeDesc"] and _count(events[-1]) == 8 * 3 - 1
    assert not logins._open
