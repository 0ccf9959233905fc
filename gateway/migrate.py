"""Schema migrations (alembic), run by the gateway itself whenever it opens its database.

The gateway upgrades on start rather than asking operators to run ``alembic upgrade``, so new code
never meets an old schema.  The scripts live in ``gateway/migrations`` so they ship with the wheel.
Several processes starting at once on PostgreSQL serialise on an advisory lock held for the upgrade
transaction (the others then find the schema at head and do nothing); on SQLite the upgrade holds the
database's write lock (``BEGIN IMMEDIATE``) for the same reason.  A database that
``metadata.create_all`` made before migrations existed is adopted by ``0001``, which creates only what
is missing (see its docstring).

A new migration, generated from the models against a database at head::

    from alembic import command
    from gateway import migrate
    from gateway.store import make_engine
    with make_engine(URL).begin() as conn:
        command.revision(migrate.config(conn), message="...", autogenerate=True, rev_id="0002")
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection, Engine

__all__ = ["LOCK_KEY", "SCRIPTS", "config", "current", "head", "schema", "upgrade"]

SCRIPTS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: any constant other applications sharing the server are unlikely to use
LOCK_KEY = 0x6761_7465_7761_7901  # "gateway" + 1


def config(connection: Connection | None = None) -> Config:
    """An alembic Config without an ini file: the scripts in the package, run on ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The revision this code expects (read once: the scripts do not change while running)."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    if revision is None:  # pragma: no cover - the package always ships 0001
        raise RuntimeError(f"no migration scripts in {SCRIPTS}")
    return revision


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty database or one made before migrations existed."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to head; a no-op (one query) when it is already there."""
    if current(engine) == head():
        return
    with engine.begin() as conn:
        _lock(conn)
        command.upgrade(config(conn), "head")


def _lock(conn: Connection) -> None:
    """Hold the upgrade against every other process until this transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # pysqlite does not begin a transaction before DDL: take the write lock ourselves, so a second
        # process waits (busy timeout) and then finds the schema at head instead of failing on CREATE TABLE
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def schema() -> MetaData:
    """Every table the migrations manage, as the models declare them (what autogenerate compares with)."""
    from gateway import auditlog, outbox, store  # imported here: these modules call upgrade() at run time

    combined = MetaData()
    for metadata in (store._metadata, outbox._metadata, auditlog._metadata):
        for table in metadata.tables.values():
            table.to_metadata(combined)
    return combined
