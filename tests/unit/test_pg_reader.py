"""PostgreSQL reads on a small pool of their own, in autocommit: no ``BEGIN``/``ROLLBACK`` round trips around
a status query or the directory's change counters, the same READ COMMITTED visibility as before, and the
writer's transactions untouched (a rolled-back accept still leaves nothing)."""

from __future__ import annotations

import time

import psycopg
from sqlalchemy import text

from gateway.store import make_engine, reader_for


def _state(url: str, pid: int) -> str:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return str(row[0]) if row else "gone"


def _round_trips(engine: object, statement: str) -> int:
    """How often psycopg waited on the server for one read through ``engine`` (a warm pool)."""
    waits = [0]
    original = psycopg.Connection.wait

    def counting(self: psycopg.Connection[object], *args: object, **kwargs: object) -> object:
        waits[0] += 1
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    psycopg.Connection.wait = counting  # type: ignore[assignment,method-assign]
    try:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            conn.exec_driver_sql(statement).all()
    finally:
        psycopg.Connection.wait = original  # type: ignore[method-assign]
    return waits[0]


def test_postgresql_reads_in_autocommit_on_their_own_pool(postgresql_url: str) -> None:
    engine = make_engine(postgresql_url)
    url = engine.url.render_as_string(hide_password=False)
    reader = reader_for(engine)
    try:
        assert reader is reader_for(engine) and reader is not engine
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x integer)"))
        with engine.connect() as writer:
            writer.execute(text("INSERT INTO t VALUES (1)"))
            with reader.connect() as conn:  # a write not yet committed is not seen (READ COMMITTED)
                assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0
                pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                # the reads left no transaction open on the server (no snapshot held, no BEGIN to send)
                assert _state(url, pid) == "idle"
            writer.commit()
        with reader.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
        # the writer still runs transactions: what it rolls back is gone
        with engine.connect() as writer:
            writer.execute(text("INSERT INTO t VALUES (2)"))
            writer.rollback()
        with reader.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
        # fewer waits on the server per read than a transaction around it
        assert _round_trips(reader, "SELECT 1") < _round_trips(engine, "SELECT 1")
    finally:
        engine.dispose()
    # disposed with its engine: its connection is closed on the server
    deadline = time.monotonic() + 5
    while _state(url, pid) != "gone" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(url, pid) == "gone"
