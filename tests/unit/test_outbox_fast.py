"""The accept, the claim and the idle poll run on the driver's cursor (gateway.dbapi), on SQLite and
PostgreSQL: the driver gets the SQL and the parameters SQLAlchemy gave it, the rows stored are the ones
SQLAlchemy's INSERTs stored, a claimed delivery reads as SQLAlchemy reads it, and a driver error is
still SQLAlchemy's exception without the letter in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from gateway.dbapi import DriverSQL
from gateway.outbox import (
    _ANY_DUE,
    _FIND_LETTER,
    _INSERT_DELIVERY,
    _INSERT_LETTER,
    Outbox,
    _claim_sql,
    _claim_statement,
    _deliveries,
    _fast,
    _letters,
)

NOW = datetime(2026, 11, 23, 12, 0, 0, 1234, tzinfo=timezone(timedelta(hours=1)))  # an offset, microseconds


def _sent_by_sqlalchemy(engine: Engine, statements: list[tuple[Any, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """The SQL and the parameters SQLAlchemy hands the driver for each statement, run in turn in one
    transaction (then rolled back)."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, sql: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((sql, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            for statement, values in statements:
                conn.execute(statement, values).close()
            conn.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _plain(parameters: Any) -> Any:
    """Parameters comparable: psycopg's ``Binary`` wrapper compares by identity, not by its bytes."""
    if isinstance(parameters, dict):
        return {k: _plain(v) for k, v in parameters.items()}
    if isinstance(parameters, tuple):
        return tuple(_plain(v) for v in parameters)
    return ("Binary", parameters.obj) if type(parameters).__name__ == "Binary" else parameters


def _accept(outbox: Outbox, key: str, deliveries: list[tuple[str, str, str, str]], **kw: Any) -> str:
    letter_id, created = outbox.accept(
        document_key=key, client="his", media_type="application/hl7-cda+xml", body=b"<ClinicalDocument>\x00\xff",
        deliveries=deliveries, audit_events=[], now=kw.pop("now", NOW), **{"set_key": None, "version": None, **kw},
    )  # fmt: skip
    assert created
    return letter_id


def test_the_driver_gets_the_sql_and_parameters_sqlalchemy_gave_it(outbox: Outbox) -> None:
    """Same SQL text, same bound values (times in SQLite's text, the body as the driver's Binary, what the
    statements hold themselves): the same locking (FOR UPDATE SKIP LOCKED), order and limit."""
    engine = outbox.engine
    sql = _fast(engine.dialect)
    stamp = sql.stamp
    letter = {
        "id": "L", "document_key": "k", "set_key": "s", "version": 2, "received_at": NOW, "client": "his",
        "media_type": "text/xml", "body": b"\x00<x/>", "replaces": None,
    }  # fmt: skip
    delivery = {
        "message_id": "m", "letter_id": "L", "recipient_id": "r", "recipient_ref": "Practitioner/p",
        "endpoint": "https://e", "status": "queued", "attempts": 0, "due_at": NOW, "updated_at": NOW,
        "queued_at": NOW, "last_error": None, "claimed_by": "w", "claimed_at": None, "sent_at": None,
        "acknowledged_at": None, "kind": "letter", "replaces": None,
    }  # fmt: skip
    times = ("received_at", "due_at", "updated_at", "queued_at")
    bound = {"body": sql.body} | dict.fromkeys(times, stamp)
    due = {"now": NOW, "expired": NOW - timedelta(minutes=2)}
    claim = {"worker": "w", "at": NOW, "limit": 10}
    cases: list[tuple[Any, DriverSQL, dict[str, Any]]] = [
        (_FIND_LETTER, sql.find, {"key": "k"}),
        (_INSERT_LETTER, sql.letter, letter),
        (_INSERT_DELIVERY, sql.deliveries, delivery),
        (_ANY_DUE, sql.any_due, due),
        (_claim_statement(0, engine.dialect.name == "postgresql"), _claim_sql(0, engine.dialect), {**claim, **due}),
        (_claim_statement(2, engine.dialect.name == "postgresql"), _claim_sql(2, engine.dialect),
         {**claim, "l0": "L", "l1": "M"}),
    ]  # fmt: skip
    sent = _sent_by_sqlalchemy(engine, [(statement, values) for statement, _, values in cases])
    assert len(sent) == len(cases)
    for (_, driver, values), (sql_text, parameters) in zip(cases, sent, strict=True):
        ours = {k: bound[k](v) if k in bound else stamp(v) if isinstance(v, datetime) else v for k, v in values.items()}
        assert (driver.sql, _plain(driver.params(ours))) == (sql_text, _plain(parameters))
    if engine.dialect.name == "postgresql":
        assert "FOR UPDATE SKIP LOCKED" in _claim_sql(0, engine.dialect).sql


def test_an_accept_stores_what_sqlalchemys_inserts_stored(outbox: Outbox) -> None:
    """Every stored value of the letter and its deliveries (held, withdrawn, replacing an earlier version's),
    the times with their offset included, is what SQLAlchemy's INSERT of the same row stores."""
    outbox.holder = "w-here"
    first = _accept(
        outbox, "doc|1", [("m1", "r1", "Practitioner/1", "https://a"), ("m2", "r2", "Practitioner/2", "https://b")],
        set_key="set|1", version=1, hold=timedelta(seconds=5),
    )  # fmt: skip
    assert len(outbox.claim("w-here", NOW, 10, letters=[first])) == 2  # in flight: the next version replaces
    _accept(outbox, "doc|2", [("m3", "r1", "Practitioner/1", "https://a")], set_key="set|1", version=2,
            now=NOW + timedelta(seconds=1, microseconds=7))  # fmt: skip
    engine = outbox.engine
    with engine.begin() as conn:
        letters = [dict(r._mapping) for r in conn.execute(select(_letters).order_by(_letters.c.document_key))]
        deliveries = [dict(r._mapping) for r in conn.execute(select(_deliveries).order_by(_deliveries.c.message_id))]
        kinds = {d["message_id"]: (d["kind"], d["replaces"]) for d in deliveries}
        assert sorted(kinds.values(), key=str) == sorted(
            [("letter", None), ("letter", None), ("letter", "m1"), ("withdrawal", "m2")], key=str
        )
        conn.execute(_letters.insert(), [{**r, "id": f"copy-{r['id']}", "document_key": f"copy-{r['document_key']}"}
                                        for r in letters])  # fmt: skip
        conn.execute(_deliveries.insert(), [{**r, "message_id": f"copy-{r['message_id']}",
                                             "letter_id": f"copy-{r['letter_id']}"} for r in deliveries])  # fmt: skip
        stored_letters = _by_key(conn.exec_driver_sql("SELECT * FROM letter").all(), 1)
        stored_deliveries = _by_key(conn.exec_driver_sql("SELECT * FROM delivery").all(), 0)
        conn.rollback()
    assert len(stored_letters) == 2 and len(stored_deliveries) == 4
    for stored in (stored_letters, stored_deliveries):
        for originals, copies in stored.values():
            assert originals and originals == copies


def _by_key(rows: list[Any], key: int) -> dict[str, tuple[list[Any], list[Any]]]:
    """Raw stored rows by their key (a copy's without its ``copy-``): (the row, its copy), ids left out."""
    found: dict[str, tuple[list[Any], list[Any]]] = {}
    for row in rows:
        name = str(row[key])
        plain = [v for i, v in enumerate(row) if i not in (0, 1)]  # ids and keys differ
        found.setdefault(name.removeprefix("copy-"), ([], []))[name.startswith("copy-")].extend(plain)
    return found


def test_a_claimed_delivery_reads_as_sqlalchemy_reads_it(outbox: Outbox) -> None:
    """What the claim returns (RETURNING, read on the cursor) is what a read through SQLAlchemy gives of the
    row it left: every field, the times aware, by letter and of what is due."""
    now = datetime(2026, 11, 23, 12, 0, 0, 1234, tzinfo=UTC)  # the gateway's clock is UTC
    one = [("m1", "r1", "Practitioner/1", "https://a")]
    held = _accept(outbox, "doc|1", one, hold=timedelta(seconds=5), now=now)
    two = [("m2", "r1", "Practitioner/1", "https://a"), ("m3", "r2", "Practitioner/2", "https://b")]
    _accept(outbox, "doc|2", two, now=now)
    at = now + timedelta(seconds=1, microseconds=5)
    due = outbox.claim("w1", at, 10)
    assert [d.message_id for d in due] == ["m2", "m3"]
    assert outbox.claim("w2", at, 10) == []  # the poll: m1 is held, m2 and m3 taken
    by_letter = outbox.claim("w2", at, 10, letters=[held])
    assert [d.message_id for d in by_letter] == ["m1"]
    for claimed in due + by_letter:
        assert claimed == outbox.delivery(claimed.message_id)
        assert claimed.status == "sending" and claimed.updated_at == at and claimed.due_at.tzinfo is not None


def test_a_driver_error_in_the_accept_and_the_claim_comes_out_as_sqlalchemys_without_parameters(
    outbox: Outbox,
) -> None:
    """What the API's 503 handler and the callers catch is SQLAlchemy's exception; the letter's key must
    not ride along in its message."""
    _accept(outbox, "doc|secret-1", [("m1", "r1", "Practitioner/1", "https://a")])
    with outbox.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE delivery")
    with pytest.raises(DBAPIError, match="delivery") as caught:
        _accept(outbox, "doc|secret-2", [("m2", "r1", "Practitioner/1", "https://a")])
    assert "secret-2" not in str(caught.value)
    with pytest.raises(DBAPIError, match="delivery"):
        outbox.claim("w1", NOW, 10)
    assert outbox.find_letter("doc|secret-2") is None  # the letter's INSERT went with the transaction
