"""Core statements run on the DB-API cursor itself, for the few hot paths where SQLAlchemy's per-execution
work (parameter processing, execution context, result objects: ~20 µs a statement on SQLite, ~50 on
PostgreSQL) costs more CPU than the database's own.  The statements stay SQLAlchemy Core (compiled once,
with the table's columns and the dialect's casts); the caller stays in its SQLAlchemy transaction, on
the same DB-API connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Column
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["DriverSQL", "bind_for", "cursor_of", "read_for"]


class DriverSQL:
    """``statement`` compiled once for ``dialect``'s driver, and how to bind named values to it.

    The values are bound as they are: a ``DateTime`` goes through :func:`bind_for` first.  What the
    statement holds itself (``status == "sending"``, ``attempts + 1``) is bound as SQLAlchemy binds it."""

    __slots__ = ("_fixed", "_order", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql: str = compiled.string  # in the driver's paramstyle
        self._order = compiled.positiontup  # a positional paramstyle (SQLite's ?): the names in order
        self._fixed = {name: bind.effective_value for bind, name in compiled.bind_names.items() if not bind.required}

    def params(self, values: Mapping[str, Any]) -> Any:
        """The parameters of ``cursor.execute(self.sql, ...)``: a tuple, or a mapping (psycopg)."""
        if self._fixed:
            values = {**self._fixed, **values}
        if self._order is None:
            return values
        return tuple(values[name] for name in self._order)


def bind_for(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """What SQLAlchemy binds for a value of ``column``: for a ``DateTime``, SQLite's own text format (PostgreSQL
    takes the datetime itself); for a ``LargeBinary``, the driver's ``Binary``."""
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return process or (lambda value: value)


def read_for(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """How SQLAlchemy turns what the driver returns for ``column`` into its value (SQLite's text of a
    ``DateTime`` into a datetime), or None when it takes the value as it is."""
    return column.type.dialect_impl(dialect).result_processor(dialect, None)


@contextmanager
def cursor_of(conn: Connection) -> Iterator[DBAPICursor]:
    """A cursor on ``conn``'s DB-API connection, so in its transaction.  A driver error comes out as
    SQLAlchemy wraps it (``OperationalError``...: the database away is a 503 for the API), without the
    statement's parameters (as ``hide_parameters``)."""
    cursor = conn.connection.cursor()
    dbapi_error: type[Exception] = conn.dialect.loaded_dbapi.Error
    try:
        yield cursor
    except dbapi_error as error:
        raise DBAPIError.instance(None, None, error, dbapi_error, hide_parameters=True, dialect=conn.dialect) from error
    finally:
        cursor.close()
