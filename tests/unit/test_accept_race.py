"""The same letter pushed twice at once (a HIS resending after its own timeout) on PostgreSQL.

Both pushes look for the letter, find nothing and insert it; the unique document key lets one through
and holds the other until the first commits.  The other must then answer as for any resend — the
letter already stored, created False — never an IntegrityError (a 500).  The race is made exact: the
first push is an open transaction of another connection that has inserted the letter and commits only
once the gateway's INSERT is waiting on it.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import make_url, text

from gateway.outbox import Outbox
from gateway.store import make_engine

KEY = "urn:oid:1.2.250.1.999|letter-raced"
NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def _accept(outbox: Outbox) -> tuple[str, bool]:
    return outbox.accept(
        document_key=KEY,
        set_key=None,
        version=None,
        client="his-resend",
        media_type="application/hl7-cda+xml",
        body=b"<ClinicalDocument/>",
        deliveries=[("msg-raced-1", "recipient-1", "Practitioner/p1", "https://127.0.0.1:9/fhir")],
        audit_events=[],
        now=NOW,
    )


def test_a_concurrent_duplicate_push_answers_already_stored(postgresql_url: str) -> None:
    engine = make_engine(postgresql_url)
    outbox = Outbox(engine)  # creates the schema
    url = make_url(postgresql_url).set(drivername="postgresql")
    try:
        with psycopg.connect(url.render_as_string(hide_password=False)) as first:
            first.execute(
                "INSERT INTO letter (id, document_key, received_at, client, media_type, body) "
                "VALUES ('letter-first', %s, %s, 'his', 'application/hl7-cda+xml', %s)",
                (KEY, NOW, b"<ClinicalDocument/>"),
            )  # not committed: the gateway's look finds nothing
            answer: dict[str, Any] = {}
            second = threading.Thread(target=lambda: answer.update(result=_try(outbox)))
            second.start()
            deadline = time.monotonic() + 20
            while not _waiting_on_a_lock(engine):
                assert second.is_alive() and time.monotonic() < deadline, answer
                time.sleep(0.02)
            first.commit()
            second.join(20)
        assert answer["result"] == ("letter-first", False)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM letter")).scalar_one() == 1
            assert conn.execute(text("SELECT count(*) FROM delivery")).scalar_one() == 0
    finally:
        outbox.reader.dispose()
        engine.dispose()


def _try(outbox: Outbox) -> Any:
    try:
        return _accept(outbox)
    except Exception as exc:  # reported by the assertion rather than lost in the thread
        return exc


def _waiting_on_a_lock(engine: Any) -> bool:
    with engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO letter%'"
            )
        ).scalar_one()
    return bool(waiting)
