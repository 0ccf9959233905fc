"""Alembic environment: runs the migrations on the connection ``gateway.migrate`` hands over.

Without one (alembic driven by hand) it opens ``GATEWAY_DATABASE_URL`` the way the gateway does.
Online only: 0001 inspects the database to adopt one made by ``create_all``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from gateway.migrate import schema


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=schema())
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("gateway migrations run online only (0001 inspects the database)")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from gateway.settings import Settings
    from gateway.store import make_engine

    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


main()
