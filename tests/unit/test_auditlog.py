"""The tamper-evident audit log: every way of altering the stored log is caught and named by
``verify`` (and ``gateway audit verify`` exits non-zero), on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from gateway import cli, migrate
from gateway.auditlog import GENESIS, audit_table, digest, pack, unpack, verify
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.store import make_engine

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
KEY = generate_key()


def _event(n: int) -> dict[str, object]:
    return {
        "resourceType": "AuditEvent",
        "id": f"ev-{n:04d}",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "subtype": [{"system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle", "code": "disclose"}],
        "recorded": (T0 + timedelta(seconds=n)).isoformat(),
        "outcome": "0",
        "agent": [
            {
                "type": {"coding": [{"code": "110152"}]},
                "who": {"reference": f"PractitionerRole/r{n % 3}"},
                "requestor": False,
            }
        ],
        "entity": [
            {
                "what": {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": f"2{n % 2}80175"}},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
            }
        ],
    }


@pytest.fixture
def log(database_url: str) -> Iterator[Engine]:
    """30 records written by the outbox in 6 transactions, checkpoints every 10 records."""
    engine = make_engine(database_url)
    outbox = Outbox(engine, Signer(KEY), checkpoint_every=10)
    for batch in range(6):
        outbox.audit([_event(batch * 5 + i + 1) for i in range(5)], now=T0 + timedelta(minutes=batch))
    yield engine
    engine.dispose()


def _sql(engine: Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def _first(engine: Engine) -> tuple[int, str]:
    report = verify(engine, [KEY])
    assert not report.ok, "the tampering went unnoticed"
    return report.problems[0].seq, report.problems[0].kind


def test_an_untouched_log_verifies(log: Engine) -> None:
    report = verify(log, [KEY])
    assert report.ok, report.problems
    assert (report.records, report.last_seq, report.checkpoints) == (30, 30, 3)
    assert report.latest_checkpoint is not None and report.latest_checkpoint[0] == 30
    assert report.unsigned_tail == 0


def _zbody(engine: Engine, seq: int) -> bytes:
    with engine.connect() as conn:
        return bytes(conn.execute(text("SELECT zbody FROM audit_event WHERE seq = :s"), {"s": seq}).scalar_one())


def test_the_append_stores_what_sqlalchemys_insert_stored(database_url: str) -> None:
    """The append writes on the driver's cursor (gateway.dbapi): every stored value, the time with its
    offset included, is what SQLAlchemy's INSERT of the same row stores."""
    engine = make_engine(database_url)
    outbox = Outbox(engine, Signer(KEY))
    now = datetime(2026, 11, 2, 10, 0, 0, 1234, tzinfo=timezone(timedelta(hours=1)))
    outbox.audit([_event(n) for n in range(3)], now=now)
    outbox.audit([_event(3)], letter_id="L-1", now=now + timedelta(seconds=1))
    assert verify(engine, [KEY]).ok
    columns = ", ".join(c.name for c in audit_table.columns if c.name != "seq")
    with engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(audit_table).order_by(audit_table.c.seq))]
        conn.execute(audit_table.insert(), [{**r, "seq": r["seq"] + 100} for r in rows])
        stored = conn.exec_driver_sql(f"SELECT {columns} FROM audit_event ORDER BY seq").all()
    engine.dispose()
    assert len(stored) == 8 and stored[:4] == stored[4:]


def test_a_driver_error_in_the_append_comes_out_as_sqlalchemys_without_parameters(database_url: str) -> None:
    """What the API's 503 handler and the callers catch is SQLAlchemy's exception, as before the append
    ran on the driver's cursor; a patient's identifier must not ride along in its message."""
    engine = make_engine(database_url)
    outbox = Outbox(engine, Signer(KEY))
    outbox.audit([_event(1)], now=T0)
    _sql(engine, "DROP TABLE audit_head")
    with pytest.raises(DBAPIError, match="audit_head") as caught:
        outbox.audit([_event(2)], now=T0)
    engine.dispose()
    assert "2080175" not in str(caught.value) and "ev-0002" not in str(caught.value)


def test_one_changed_byte_is_named(log: Engine) -> None:
    stored = bytearray(_zbody(log, 7))
    stored[len(stored) // 2] ^= 0x01
    _sql(log, "UPDATE audit_event SET zbody = :z WHERE seq = 7", z=bytes(stored))
    assert _first(log) == (7, "edited")


def test_a_changed_search_column_is_named(log: Engine) -> None:
    _sql(log, "UPDATE audit_event SET patient = 'urn:oid:1.2.250.1.213.1.4.8|999' WHERE seq = 12")
    assert _first(log) == (12, "edited")


def test_an_edit_with_its_hash_recomputed_is_named(log: Engine) -> None:
    with log.begin() as conn:
        row = conn.execute(text("SELECT * FROM audit_event WHERE seq = 14")).one()
        body = pack({**unpack(row.zbody, None), "outcome": "8"})
        forged = digest(row.prev_hash, row.id, row.at, row.letter_id, row.patient, row.recipient, "8", row.kind, body)
        conn.execute(
            text("UPDATE audit_event SET zbody = :b, outcome = '8', hash = :h WHERE seq = 14"), {"b": body, "h": forged}
        )
    assert _first(log) == (14, "edited")


def test_a_removed_record_is_named(log: Engine) -> None:
    _sql(log, "DELETE FROM audit_event WHERE seq = 12")
    seq, kind = _first(log)
    assert (seq, kind) == (13, "removed")
    assert "12..12 missing" in verify(log, [KEY]).problems[0].text


def test_two_swapped_records_are_named(log: Engine) -> None:
    _sql(log, "UPDATE audit_event SET seq = -1 WHERE seq = 5")
    _sql(log, "UPDATE audit_event SET seq = 5 WHERE seq = 9")
    _sql(log, "UPDATE audit_event SET seq = 9 WHERE seq = -1")
    assert _first(log) == (5, "reordered")


def test_an_inserted_record_is_named(log: Engine) -> None:
    with log.begin() as conn:
        for seq in range(30, 10, -1):  # make room after record 10
            conn.execute(text("UPDATE audit_event SET seq = seq + 1 WHERE seq = :s"), {"s": seq})
        ten = conn.execute(text("SELECT hash, at FROM audit_event WHERE seq = 10")).one()
        body = pack(_event(999))
        forged = digest(ten.hash, "ev-0999", ten.at, None, None, None, "0", "disclose", body)
        conn.execute(
            text(
                "INSERT INTO audit_event (seq, id, recorded, body, zbody, at, outcome, kind, prev_hash, hash) "
                "VALUES (11, 'ev-0999', :rec, '', :body, :at, '0', 'disclose', :prev, :hash)"
            ),
            {"rec": T0, "body": body, "at": ten.at, "prev": ten.hash, "hash": forged},
        )
    assert _first(log) == (11, "inserted")


def test_a_truncated_tail_is_named_even_with_the_head_row_fixed(log: Engine) -> None:
    with log.begin() as conn:
        conn.execute(text("DELETE FROM audit_event WHERE seq > 24"))
        last = conn.execute(text("SELECT hash FROM audit_event WHERE seq = 24")).scalar()
        conn.execute(text("UPDATE audit_head SET seq = 24, hash = :h"), {"h": last})
    report = verify(log, [KEY])
    assert [p.kind for p in report.problems] == ["truncated"]
    assert "ends at seq 24" in report.problems[0].text and "seq 30" in report.problems[0].text


def test_a_forged_checkpoint_is_named(log: Engine) -> None:
    other = Signer(generate_key())
    forger = Outbox(log, other, checkpoint_every=10_000)
    forger.log.checkpoint(T0 + timedelta(hours=1))  # at seq 30: already signed by the gateway -> nothing new
    _sql(log, "DELETE FROM audit_checkpoint WHERE seq = 20")
    with log.begin() as conn:
        row = conn.execute(text("SELECT hash FROM audit_event WHERE seq = 20")).one()
    with log.begin() as conn:
        forger.log._checkpoint(conn, 20, row.hash, T0)
    assert _first(log) == (20, "forged-checkpoint")


def test_an_altered_checkpoint_signature_is_named(log: Engine) -> None:
    _sql(log, "UPDATE audit_checkpoint SET jws = substr(jws, 1, length(jws) - 4) || 'AAAA' WHERE seq = 10")
    assert _first(log) == (10, "forged-checkpoint")


def test_a_rewritten_chain_is_caught_by_the_signed_checkpoints(log: Engine) -> None:
    """Re-hash everything after an edit: the chain is consistent again, the signatures are not."""
    with log.begin() as conn:
        rows = conn.execute(text("SELECT * FROM audit_event ORDER BY seq")).all()
        prev = GENESIS
        for row in rows:
            body = pack({**unpack(row.zbody, None), "outcome": "8"}) if row.seq == 3 else bytes(row.zbody)
            outcome = "8" if row.seq == 3 else row.outcome
            new = digest(prev, row.id, row.at, row.letter_id, row.patient, row.recipient, outcome, row.kind, body)
            conn.execute(
                text("UPDATE audit_event SET zbody = :b, outcome = :o, prev_hash = :p, hash = :h WHERE seq = :s"),
                {"b": body, "o": outcome, "p": prev, "h": new, "s": row.seq},
            )
            prev = new
        conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
    assert _first(log) == (10, "rewritten")


def test_a_checkpoint_kept_elsewhere_catches_a_rewrite_after_the_last_signed_one(log: Engine) -> None:
    report = verify(log, [KEY])
    kept = (report.last_seq, report.head)
    _sql(log, "DELETE FROM audit_checkpoint")
    _sql(log, "DELETE FROM audit_event WHERE seq = 30")
    _sql(log, "UPDATE audit_head SET seq = 29")
    assert verify(log, [KEY]).ok, "without checkpoints the cut tail is invisible to the chain alone"
    problems = verify(log, [KEY], expect=kept).problems
    assert [p.kind for p in problems] == ["truncated"]


def test_records_written_before_the_chain_existed_are_chained_on_upgrade(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(migrate.config(conn), "0001")
        for n in range(1, 4):
            conn.execute(
                text("INSERT INTO audit_event (id, recorded, letter_id, body) VALUES (:i, :r, 'L1', :b)"),
                {"i": f"ev-{n}", "r": T0, "b": orjson.dumps(_event(n)).decode()},
            )
    outbox = Outbox(engine, Signer(KEY))  # upgrades to head
    outbox.audit([_event(4)], now=T0)
    report = verify(engine, [KEY])
    assert report.ok and report.records == 4
    with engine.connect() as conn:
        patients = conn.execute(text("SELECT patient FROM audit_event ORDER BY seq")).scalars().all()
    assert patients[0] == "urn:oid:1.2.250.1.213.1.4.8|2180175"


def test_the_command_names_the_first_broken_record_and_exits_non_zero(
    log: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gw.jwk").write_bytes(orjson.dumps(KEY.as_dict(private=False)))
    url = log.url.render_as_string(hide_password=False)
    monkeypatch.setitem(os.environ, "GATEWAY_DATABASE_URL", url)
    assert cli.main(["audit", "verify", "--trust", str(tmp_path / "gw.jwk")]) == 0
    assert "chain intact" in capsys.readouterr().out
    _sql(log, "DELETE FROM audit_event WHERE seq = 17")
    assert cli.main(["audit", "verify", "--trust", str(tmp_path / "gw.jwk")]) == 1
    out = capsys.readouterr().out
    assert "CHAIN BROKEN at record 18: removed" in out
