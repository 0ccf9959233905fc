"""Core statements bound for the driver's cursor (gateway.dbapi): the same parameters SQLAlchemy binds."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite

from gateway.dbapi import DriverSQL
from gateway.outbox import _finish_group


def test_what_the_statement_holds_is_bound_as_sqlalchemy_binds_it() -> None:
    statement = _finish_group(("sent_at",), 2)  # status == "sending", attempts + 1, claimed_by = NULL...
    values = {"w": "w1", "s": "sent", "t": "T", "e": None, "d": "D", "m0": "a", "m1": "b"}
    positional = DriverSQL(statement, sqlite.dialect())
    assert positional.sql.startswith("UPDATE delivery SET status=?, attempts=(delivery.attempts + ?)")
    assert positional.params(values) == ("sent", 1, "D", None, None, "T", None, "T", "a", "b", "w1", "sending")
    named = DriverSQL(statement, postgresql.psycopg.dialect())
    held = {"attempts_1": 1, "claimed_by": None, "claimed_at": None, "status_1": "sending"}
    assert named.params(values) == {**values, **held}
