"""Migrations: they build exactly the models' schema, run once, adopt pre-migration databases, and
survive several processes upgrading the same database at once — on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine

from gateway import migrate
from gateway.outbox import Outbox
from gateway.store import ResourceStore, make_engine
from tests.conftest import ROOT

UPGRADE = "import sys; from gateway.store import make_engine; from gateway.migrate import upgrade\n" + (
    "import time; start = float(sys.argv[2])\n"
    "while time.time() < start: time.sleep(0.005)\n"  # all processes upgrade at the same instant
    "engine = make_engine(sys.argv[1]); upgrade(engine); engine.dispose()"
)
LATER_DELIVERY_COLUMNS = ("queued_at", "sent_at", "acknowledged_at")
NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), migrate.schema()))


def _statements(engine: Engine) -> list[str]:
    """Every SQL statement the engine runs from now on (to prove a second upgrade writes nothing)."""
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2].split(None, 1)[0].upper()))
    return seen


def test_the_migrations_build_exactly_the_models_schema(engine: Engine) -> None:
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert _differences(engine) == []
    assert set(inspect(engine).get_table_names()) == {*migrate.schema().tables, "alembic_version"}


def test_upgrading_twice_is_a_no_op(engine: Engine) -> None:
    store = ResourceStore(engine=engine)
    store.put("Organization", "org-1", {"name": "kept"})
    statements = _statements(engine)
    Outbox(engine)
    migrate.upgrade(engine)
    assert statements and set(statements) <= {"SELECT", "PRAGMA"}, "an up-to-date schema is only read"
    assert migrate.current(engine) == migrate.head()
    assert store.read("Organization", "org-1") == store.history("Organization", "org-1")[0][3]


@pytest.mark.parametrize("left", ["store only", "outbox without the delivery timestamps"])
def test_a_database_made_by_create_all_before_migrations_is_adopted(engine: Engine, left: str) -> None:
    models = migrate.schema()
    if left == "store only":  # what `gateway dispatch --store` left: no outbox yet
        models.tables["resource_version"].create(engine)
    else:
        models.create_all(engine)
        with engine.begin() as conn:
            for column in LATER_DELIVERY_COLUMNS:
                conn.execute(text(f"ALTER TABLE delivery DROP COLUMN {column}"))
    with engine.begin() as conn:
        conn.execute(
            models.tables["resource_version"].insert(),
            {
                "resource_type": "Organization",
                "id": "org-1",
                "version": 1,
                "last_updated": NOW,
                "deleted": False,
                "body": "{}",
            },
        )
    store = ResourceStore(engine=engine)
    assert migrate.current(engine) == migrate.head()
    assert _differences(engine) == []
    assert store.read("Organization", "org-1") == {}, "what was stored before is kept"
    assert store.changes() == {"Organization": 1}, "the write counters start from what is stored"


def test_make_engine_gives_plain_postgresql_urls_the_psycopg3_driver() -> None:
    for url in ("postgresql://gw@db.example:5432/gateway", "postgres://gw@db.example/gateway"):
        engine = make_engine(url)
        assert engine.url.drivername == "postgresql+psycopg" and engine.url.database == "gateway"
        engine.dispose()
    explicit = make_engine("postgresql+psycopg://gw@db.example/gateway")
    assert explicit.url.drivername == "postgresql+psycopg"
    explicit.dispose()


def test_the_scripts_ship_inside_the_package() -> None:
    assert migrate.SCRIPTS.is_relative_to(ROOT / "gateway")
    assert (migrate.SCRIPTS / "env.py").is_file() and (migrate.SCRIPTS / "script.py.mako").is_file()
    assert migrate.head() == "0007"


def test_several_processes_upgrading_at_once_all_succeed(database_url: str) -> None:
    start = time.time() + 1.5
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE, database_url, str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [(w.wait(60), w.stderr.read() if w.stderr else "") for w in workers]
    for worker in workers:
        for stream in (worker.stdout, worker.stderr):
            if stream:
                stream.close()
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], [err for _, err in outcomes]
    engine = make_engine(database_url)
    try:
        assert migrate.current(engine) == migrate.head()
        assert _differences(engine) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(migrate.head(),)]
    finally:
        engine.dispose()


def test_an_upgrade_waits_for_the_advisory_lock(postgresql_url: str) -> None:
    with psycopg.connect(postgresql_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.LOCK_KEY,))
        worker = subprocess.Popen(
            [sys.executable, "-c", UPGRADE, postgresql_url, "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            while holder.execute(waiting).fetchone() != (1,):  # the upgrade has reached the lock and waits
                assert worker.poll() is None and time.monotonic() < deadline, "the upgrade did not wait for the lock"
                time.sleep(0.02)
            tables = holder.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()
            assert tables == (0,), "nothing was created while another process held the lock"
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.LOCK_KEY,))
        assert worker.wait(60) == 0, worker.stderr.read() if worker.stderr else ""
        if worker.stderr:
            worker.stderr.close()
    engine = make_engine(postgresql_url)
    try:
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()
