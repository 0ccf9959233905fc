"""The database away while letters arrive: a 503 OperationOutcome with ``Retry-After`` (over MLLP an AR
"resend it later"), nothing half-stored.

A full disk is SQLite's own ``SQLITE_FULL`` (``PRAGMA max_page_count`` at the file's current size, as a
volume with no room left answers); a database that is gone is a renamed SQLite directory, or a PostgreSQL
database that refuses connections (``ALLOW_CONNECTIONS false``, its sessions ended).  Each time the HIS
must read "send again later" (503, code ``transient``) — not a 500 that reads as our bug — for a good
letter, and for a bad one whose refusal cannot be audited (a refusal is answered only once audited), the log must name the failure
without any SQL parameter, and the same letter sent again once the database is back is accepted once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Engine

from gateway.api.app import create_app
from gateway.demo import seed_store
from gateway.intake import Intake
from gateway.mllp import MllpListener
from gateway.outbox import Outbox
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES, _postgres_admin_url, mappings
from tests.hl7v2_messages import mdm, send_all

HIS = "his-key-0123456789abcdef0000"
LETTER = (FIXTURES / "dispatch" / "ldl-ses-s1-pharmacy.xml").read_bytes()
MALFORMED = (FIXTURES / "cda" / "bad" / "malformed.xml").read_bytes()
PATIENT = ("244037511305285", "IPP0004527891")


def _gateway(engine: Engine) -> TestClient:
    store = ResourceStore(engine=engine)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")
    return TestClient(create_app(Settings(api_keys={HIS: frozenset({"his"})}), store, Outbox(engine), mappings()))


def _push(client: TestClient, body: bytes = LETTER) -> Any:
    headers = {"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}
    return client.post("/letters", content=body, headers=headers)


def _letters(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM letter")).scalar_one())


def _unavailable(answer: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "10"
    assert answer.headers["content-type"].startswith("application/fhir+json")
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in body["issue"]] == ["transient"]
    assert "nothing was stored" in body["issue"][0]["diagnostics"]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "database unavailable" in logged
    assert "[parameters:" not in logged and not [p for p in PATIENT if p in logged]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[tuple[Engine, TestClient, Any]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    client = _gateway(engine)
    assert _push(client).status_code == 202  # a first letter: the file is as large as it needs to be
    with engine.connect() as conn:
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())

    def no_room(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    yield engine, client, no_room
    engine.dispose()


def test_a_full_disk_answers_503_and_the_letter_is_accepted_once_there_is_room(
    full_disk: tuple[Engine, TestClient, Any], caplog: pytest.LogCaptureFixture
) -> None:
    engine, client, no_room = full_disk
    other = LETTER.replace(b"LDL-SES-20261030-000458", b"LDL-SES-20261030-000999")
    assert other != LETTER
    event.listen(engine, "connect", no_room)
    engine.dispose()  # every connection from now on sees the full disk
    with caplog.at_level(logging.WARNING, logger="gateway.api"):
        _unavailable(_push(client, other), caplog)
    event.remove(engine, "connect", no_room)
    engine.dispose()
    assert _letters(engine) == 1, "nothing of the refused attempt was stored"
    again = _push(client, other)
    assert again.status_code == 202, again.text
    assert _push(client, other).status_code == 200, "sent a third time: the same letter"
    assert _letters(engine) == 2


def test_a_database_that_is_gone_answers_503_then_takes_the_letter(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if database_url.startswith("sqlite"):
        home = tmp_path / "volume"
        home.mkdir()
        database_url = f"sqlite:///{home / 'gateway.db'}"
    engine = make_engine(database_url)
    client = _gateway(engine)
    try:
        with _gone(database_url, engine, tmp_path), caplog.at_level(logging.WARNING, logger="gateway.api"):
            _unavailable(_push(client), caplog)
            _unavailable(_push(client, MALFORMED), caplog)  # its refusal cannot be audited: not answered yet
        engine.dispose()
        accepted = _push(client)
        assert accepted.status_code == 202, accepted.text
        assert _letters(engine) == 1
    finally:
        engine.dispose()


class _gone:
    """The database unreachable inside the ``with`` block, back after it."""

    def __init__(self, url: str, engine: Engine, tmp_path: Path) -> None:
        self.url, self.engine, self.tmp_path = url, engine, tmp_path

    def __enter__(self) -> None:
        self.engine.dispose()
        if self.url.startswith("sqlite"):
            home = Path(make_url(self.url).database or "").parent
            home.rename(self.tmp_path / "elsewhere")
            return
        self._postgres("ALTER DATABASE {} ALLOW_CONNECTIONS false", terminate=True)

    def __exit__(self, *_: object) -> None:
        if self.url.startswith("sqlite"):
            (self.tmp_path / "elsewhere").rename(Path(make_url(self.url).database or "").parent)
            return
        self._postgres("ALTER DATABASE {} ALLOW_CONNECTIONS true")

    def _postgres(self, statement: str, terminate: bool = False) -> None:
        name = make_url(self.url).database
        if not name or "search_path" in self.url:
            pytest.skip("this PostgreSQL role cannot refuse connections to its own database")
        with psycopg.connect(_postgres_admin_url(), autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL(statement).format(psycopg.sql.Identifier(name)))
            if terminate:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )


def test_over_mllp_a_full_disk_is_ar_resend_later_then_aa(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")
    with engine.connect() as conn:
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())

    def no_room(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    listener = MllpListener(Intake(Settings(), store, outbox, mappings(), source="mllp"), port=0)
    port = listener.start_in_thread()
    try:
        event.listen(engine, "connect", no_room)
        engine.dispose()
        with caplog.at_level(logging.WARNING, logger="gateway.mllp"):
            [refused] = send_all(port, [mdm(control="FULL-1")])
        msa = next(s for s in refused.decode().split("\r") if s.startswith("MSA")).split("|")
        err = next(s for s in refused.decode().split("\r") if s.startswith("ERR")).split("|")
        assert msa[1:3] == ["AR", "FULL-1"] and "not stored; resend it later" in err[8]
        assert any("database unavailable" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.exc_info], "no traceback: the failure is named, not dumped"
        event.remove(engine, "connect", no_room)
        engine.dispose()
        [accepted] = send_all(port, [mdm(control="FULL-2")])
        assert "|AA|FULL-2|" in accepted.decode()
    finally:
        listener.close()
        engine.dispose()
