"""No statement of a letter's way through the service scans a table that grows with every letter.

The letter, delivery and audit tables hold every letter ever accepted, the resource store every
patient's consents: a statement that reads one of them whole costs more with each letter, so a gateway
that was fast on its first day slows down for good (accepting a letter once looked up its set's other
versions by reading the whole letter table — ~420 page reads per letter after 900 letters, until
migration 0004 indexed it; and counted every stored version to learn whether the directory or a
consent had changed, until migration 0005 counted the writes instead).

The service runs a letter's whole way (accept, a duplicate, a new version of it, delivery, status
queries, the audit trail, an auditor's questions about one patient or one letter, the periodic
housekeeping) while every SQL statement is recorded with its parameters; each one is then
explained by the database itself with those parameters.  SQLite's plan must not ``SCAN`` a growing
table; PostgreSQL's, with sequential scans priced out (``enable_seqscan = off``, so its planner's
preference for scanning a tiny test table does not hide a missing index), must not ``Seq Scan`` one.

Not run here, because they read everything by design: the audit export and chain verification, the
unfiltered audit search (its ``total`` counts every record), the unfiltered ``GET /deliveries`` (its
pages of one state are run: migration 0007 indexes them) and the ``/metrics`` counts by status.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from gateway.store import reader_for
from tests.e2e.test_service import ADMIN, DISPATCH, HIS, running_service
from tests.e2e.test_versions import _version

# every letter adds to the first three; the resource store grows with every patient's consents
GROWING = ("letter", "delivery", "audit_event", "resource_version")
_SQLITE_SCAN = re.compile(rf"\bSCAN ({'|'.join(GROWING)})\b")
_PG_SCAN = re.compile(rf"Seq Scan on ({'|'.join(GROWING)})\b")
# what may read a growing table whole, and why: none of it runs per letter
_ALLOWED = (
    re.compile(r"^\s*(CREATE|ALTER|DROP|PRAGMA|INSERT|BEGIN|COMMIT|SAVEPOINT|RELEASE|SET|SHOW)\b", re.I),
    re.compile(r"alembic_version|pg_catalog|information_schema|sqlite_master|pg_advisory", re.I),
)


def _record(engine: Engine, seen: dict[str, Any]) -> None:
    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if not many and not any(rule.search(statement) for rule in _ALLOWED):
            seen.setdefault(statement, parameters)

    event.listen(engine, "before_cursor_execute", before)


def _explain(engine: Engine, statement: str, parameters: Any) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return "\n".join(str(row[-1]) for row in rows)
        conn.exec_driver_sql("SET enable_seqscan = off")
        rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
        conn.rollback()  # EXPLAIN of an UPDATE does not run it; leave nothing behind either way
        return "\n".join(str(row[0]) for row in rows)


@pytest.fixture
def recorded(tmp_path: Path, database_url: str) -> Iterator[tuple[Engine, dict[str, Any]]]:
    seen: dict[str, Any] = {}
    with running_service(tmp_path, database_url) as service:
        engine: Engine = service["engine"]
        _record(engine, seen)
        if reader_for(engine) is not engine:
            _record(reader_for(engine), seen)
        client, worker = service["client"], service["worker"]
        headers = {"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}
        for body in (_version(1), _version(1), (DISPATCH / "ldl-ses-s6-objection.xml").read_bytes()):
            assert client.post("/letters", content=body, headers=headers).status_code in (200, 202)
        worker.run_once()
        newer = client.post("/letters", content=_version(2), headers=headers)
        assert newer.status_code == 202, newer.text
        worker.run_once()
        older = client.post("/letters", content=_version(1).replace(b"-V1", b"-V0"), headers=headers)
        assert older.status_code in (200, 202), older.text
        worker.run_once()
        letter_id = newer.json()["letterId"]
        assert client.get(f"/letters/{letter_id}", headers={"Authorization": f"Bearer {HIS}"}).status_code == 200
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert client.get(f"/letters/{letter_id}/audit", headers=admin).status_code in (200, 404)
        # what an auditor asks of one patient or one letter, and what the service does periodically
        patient = "urn:oid:1.2.250.1.213.1.4.10|244037511305285"
        for query in (f"/AuditEvent?patient={patient}", f"/AuditEvent?letter={letter_id}"):
            assert client.get(query, headers=admin).status_code == 200, query
        assert client.get(f"/Patient/$audit-report?identifier={patient}", headers=admin).status_code == 200
        # an operator paging through one state of the outbox, as far as a second page
        listing = client.get("/deliveries", params={"status": "acknowledged", "_count": 1}, headers=admin)
        assert listing.status_code == 200 and "link" in listing.headers, listing.headers
        assert client.get(listing.headers["link"][1:-13], headers=admin).status_code == 200
        worker.expire_unacknowledged()
        service["outbox"].log.checkpoint()
        later = datetime.now(UTC) + timedelta(days=31)
        assert service["outbox"].erase_letters(later - timedelta(days=30), later, "30 days"), "the retention ran"
        yield engine, seen


def test_no_statement_of_a_letters_way_scans_a_growing_table(recorded: tuple[Engine, dict[str, Any]]) -> None:
    engine, seen = recorded
    scan = _SQLITE_SCAN if engine.dialect.name == "sqlite" else _PG_SCAN
    assert len(seen) >= 10, "the flow ran too few statements to prove anything"
    touching = [s for s in seen if any(re.search(rf"\b{t}\b", s) for t in GROWING)]
    assert any("set_key" in s for s in touching), "the version look-up this test guards was not run"
    scans = {}
    for statement in touching:
        plan = _explain(engine, statement, seen[statement])
        if scan.search(plan):
            scans[" ".join(statement.split())[:200]] = plan
    assert scans == {}


def test_a_page_of_one_delivery_state_is_read_in_index_order(recorded: tuple[Engine, dict[str, Any]]) -> None:
    """``GET /deliveries?status=`` reads its page from ``ix_delivery_status_updated``: without it, every
    page would read and sort every delivery in that state (all the acknowledged ones: the history)."""
    engine, seen = recorded
    listing = [s for s in seen if "ORDER BY delivery.updated_at, delivery.message_id" in s]
    assert len(listing) == 2, "the first page and the next one"
    for statement in listing:
        plan = _explain(engine, statement, seen[statement])
        assert "ix_delivery_status_updated" in plan and not re.search(r"TEMP B-TREE|Sort\b", plan), plan
