"""The receiver's shortcuts answer as the paths they skip: the ``$process-message`` shortcut past FastAPI's
router gives the same status, headers and bytes as the FastAPI route for every answer (ok, resend,
refusals, 405/404, a 500), the raw DBAPI insert stores the row SQLAlchemy's INSERT stored, and
``seal._b64url`` is joserfc's base64url."""

from __future__ import annotations

import copy
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from joserfc.util import urlsafe_b64encode
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql, sqlite

from gateway import crypt, receiver, seal
from gateway.dbapi import DriverSQL
from gateway.receiver import _FIRST_RESPONSE, _INSERT, _Messages, _metadata, create_receiver
from gateway.seal import Signer, generate_key, sign
from gateway.store import make_engine
from tests import pki
from tests.dispatch_cases import run

SIGNER = Signer(generate_key())
CA = pki.ca()
RECIPIENT = pki.issue(CA, "gp-roussel", encryption=True)
OTHER = pki.issue(CA, "someone-else", encryption=True)
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
STAMP = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"')


def _sealed(name: str = "Organization-saad-tilleuls") -> dict[str, Any]:
    return sign(copy.deepcopy(run("s1").messages[name]), SIGNER, "2026-10-30T11:30:00+01:00")


def _without_shortcut(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not receiver._Shortcut]
    app.middleware_stack = None
    return app


def _pair(tmp_path: Path, **options: Any) -> Iterator[tuple[TestClient, TestClient]]:
    """The receiver as built, and the same receiver answering through its FastAPI route."""
    made = [
        create_receiver(
            f"sqlite:///{tmp_path / f'{side}.db'}", [SIGNER.key], endpoint="https://rx.test/fhir", **options
        )
        for side in ("fast", "plain")
    ]
    assert any(m.cls is receiver._Shortcut for m in made[0].user_middleware)
    with (
        TestClient(made[0], raise_server_exceptions=False) as fast,
        TestClient(_without_shortcut(made[1]), raise_server_exceptions=False) as plain,
    ):
        yield fast, plain


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    yield from _pair(tmp_path, decryption_keys=[crypt.load_private_key(RECIPIENT.key_pem)])


def _same(pair: tuple[TestClient, TestClient], method: str, path: str, **request: Any) -> tuple[int, bytes]:
    """Both answer alike; an ok answer's ids and timestamp are fresh on each side, so they are masked."""
    fast, plain = (client.request(method, path, **request) for client in pair)
    assert fast.status_code == plain.status_code
    assert fast.headers.raw == plain.headers.raw
    bodies = [STAMP.sub(b"", UUID.sub(b"U", answer.content)) for answer in (fast, plain)]
    assert bodies[0] == bodies[1]
    if fast.status_code != 200:  # a refusal: nothing random in it
        assert fast.content == plain.content
        assert fast.json()["resourceType"] == "OperationOutcome"
    return fast.status_code, fast.content


def test_every_answer_is_the_fastapi_routes_answer(pair: tuple[TestClient, TestClient]) -> None:
    message = _sealed()
    body = orjson.dumps(message)
    fhir = {"Content-Type": "application/fhir+json"}
    status, first = _same(pair, "POST", "/fhir/saad/$process-message", content=body, headers=fhir)
    assert status == 200 and orjson.loads(first)["entry"][0]["resource"]["response"]["code"] == "ok"
    assert pair[0].post("/$process-message", content=body, headers=fhir).content == first  # a resend
    altered = copy.deepcopy(message)
    altered["entry"][0]["resource"]["eventCoding"]["code"] = "other"
    unknown = sign(copy.deepcopy(run("s1").messages["Organization-saad-tilleuls"]), Signer(generate_key()), "x")
    jwe = crypt.encrypt(
        orjson.dumps(_sealed("PractitionerRole-gp-roussel")), crypt.recipient_key(RECIPIENT.der, pki.NOW)
    )
    for_other = crypt.encrypt(body, crypt.recipient_key(OTHER.der, pki.NOW))
    refused = {
        b"{nope": ("structure", fhir),
        b"[1]": ("invalid", fhir),
        orjson.dumps({"resourceType": "Bundle", "type": "message", "entry": [{"resource": {}}]}): ("invalid", fhir),
        orjson.dumps({k: v for k, v in message.items() if k != "signature"}): ("security", fhir),
        orjson.dumps(altered): ("security", fhir),
        orjson.dumps(unknown): ("security", fhir),
        for_other: ("security", {"Content-Type": "application/jose"}),
        b"not a jwe": ("security", {"Content-Type": "application/jose+json; charset=utf-8"}),
    }
    for content, (code, headers) in refused.items():
        status, answer = _same(pair, "POST", "/$process-message", content=content, headers=headers)
        assert status == 400 and orjson.loads(answer)["issue"][0]["code"] == code
    status, _ = _same(
        pair, "POST", "/fhir/gp/$process-message", content=jwe, headers={"Content-Type": "application/jose"}
    )
    assert status == 200
    assert _same(pair, "GET", "/fhir/gp/$process-message")[0] == 405
    assert _same(pair, "PUT", "/$process-message", content=body)[0] == 405
    assert _same(pair, "POST", "/fhir/gp/$process-message/x", content=body)[0] == 404
    assert _same(pair, "POST", "/messages", content=body)[0] == 405
    listed = [client.get("/messages").json() for client in pair]
    assert [[m["messageHeader"] for m in side] for side in listed] == [
        [message["entry"][0]["resource"]["id"], _sealed("PractitionerRole-gp-roussel")["entry"][0]["resource"]["id"]]
    ] * 2


def test_an_unexpected_error_is_the_same_500(
    pair: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(receiver, "verify", broken)
    status, answer = _same(pair, "POST", "/$process-message", content=orjson.dumps(_sealed()))
    assert status == 500 and orjson.loads(answer)["issue"][0]["code"] == "exception"


def test_limits_and_encryption_only_answer_alike(tmp_path: Path) -> None:
    for pair in _pair(tmp_path, max_bytes=2048, require_encryption=True):
        for request, expected in (
            ({"content": b"{" + b" " * 4096 + b"}"}, 413),  # over the limit, declared
            ({"content": b"{}", "headers": {"Content-Length": "x2"}}, 413),
            ({"content": orjson.dumps({"resourceType": "Bundle"})}, 400),  # in clear
            ({"content": b"{}", "headers": {"Content-Type": "application/jose"}}, 400),  # no decryption key
        ):
            assert _same(pair, "POST", "/fhir/ep/$process-message", **request)[0] == expected
        chunked = [client.post("/$process-message", content=iter([b"{", b" " * 4096, b"}"])) for client in pair]
        assert [a.status_code for a in chunked] == [413, 413]  # over the limit, no length declared
        assert chunked[0].content == chunked[1].content


def test_the_shortcut_skips_the_router_and_nothing_else(
    pair: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    handled: list[str] = []
    handle = APIRoute.handle

    async def counted(route: APIRoute, *args: Any) -> None:
        handled.append(route.path)
        await handle(route, *args)

    monkeypatch.setattr(APIRoute, "handle", counted)
    fast, plain = pair
    body = orjson.dumps(_sealed())
    assert fast.post("/fhir/x/$process-message", content=body).status_code == 200
    assert fast.post("/$process-message", content=body).status_code == 200
    assert handled == []
    assert plain.post("/fhir/x/$process-message", content=body).status_code == 200
    assert fast.get("/messages").status_code == 200
    assert handled == ["/{mailbox:path}/$process-message", "/messages"]
    paths = fast.get("/openapi.json").json()["paths"]  # still declared
    assert list(paths) == list(plain.get("/openapi.json").json()["paths"])
    assert {"/$process-message", "/{mailbox}/$process-message", "/messages"} <= set(paths)


# -- the store ---------------------------------------------------------------------------------------


def _raw_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        columns = ("message_id", "bundle_id", "received_at", "response", "body")
        listed = ", ".join(f"{c}, typeof({c})" for c in columns)
        return conn.execute(f"SELECT {listed} FROM received_message ORDER BY message_id").fetchall()


def test_the_raw_insert_stores_what_sqlalchemys_insert_stored(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    rows = [
        {
            "message_id": f"m-{n}",
            "bundle_id": "b",
            "received_at": datetime(2026, 11, 5, 10, 30, n, 1000 * n, tzinfo=UTC),
            "response": '{"é":"’"}',
            "body": orjson.dumps(_sealed()).decode() + "  \n",
        }
        for n in range(3)
    ]
    fast, plain = (make_engine(f"sqlite:///{tmp_path / f'{side}.db'}") for side in ("fast", "plain"))
    for engine in (fast, plain):
        _metadata.create_all(engine)
    messages = _Messages(fast)
    for row in rows:
        assert messages.store(dict(row)) is None
        with plain.begin() as conn:
            conn.execute(_INSERT, row)
    assert messages.store({**rows[1], "response": "another", "body": "{}"}) == rows[1]["response"]
    fast.dispose()
    plain.dispose()
    assert _raw_rows(tmp_path / "fast.db") == _raw_rows(tmp_path / "plain.db")
    assert _raw_rows(tmp_path / "fast.db")[1][4:6] == ("2026-11-05 10:30:01.001000", "text")


def test_statements_are_compiled_for_the_drivers_paramstyle() -> None:
    values = {"message_id": "m", "bundle_id": "b", "received_at": "t", "response": "r", "body": "x"}
    insert = DriverSQL(_INSERT, sqlite.dialect())
    assert (
        insert.sql
        == "INSERT INTO received_message (message_id, bundle_id, received_at, response, body) VALUES (?, ?, ?, ?, ?)"
    )
    assert insert.params(values) == ("m", "b", "t", "r", "x")
    first = DriverSQL(_FIRST_RESPONSE, postgresql.psycopg.dialect())
    assert "%(message_id)s" in first.sql and first.params(values) is values
    engine = create_engine("postgresql+psycopg://rx@127.0.0.1:1/rx")  # never connected
    messages = _Messages(engine)
    assert messages._duplicate is psycopg.IntegrityError
    stamp = object()
    assert messages._stamp(stamp) is stamp  # type: ignore[arg-type]  # psycopg binds the datetime itself


# -- the seal --------------------------------------------------------------------------------------------


@given(st.binary(max_size=300) | st.sampled_from([bytes(range(256)) * 40, b"\xfb\xff" * 999, b"\xff" * 1000]))
def test_b64url_is_joserfcs(data: bytes) -> None:
    assert seal._b64url(data) == urlsafe_b64encode(data)


def test_no_request_looks_for_opentelemetry_providers(
    pair: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.telemetry import _asgi

    looked: list[str] = []
    monkeypatch.setattr(_asgi, "_unconfigured", lambda provider: looked.append(type(provider).__name__) or True)
    fast, _ = pair
    assert fast.post("/$process-message", content=orjson.dumps(_sealed())).status_code == 200
    assert fast.get("/messages").status_code == 200
    assert looked == []
    default = FastAPI()  # what the receiver turned off: FastAPI's check on every request
    TestClient(default).get("/")
    assert looked
