"""The audit log: append-only AuditEvents, each chained to the previous one by its hash, with signed
checkpoints — so anyone holding the gateway's public key can check that nothing was changed.

Each record's ``hash`` is SHA-256 over the previous record's hash and the record's own content (its
id, time, letter, patient, recipient, outcome, kind and the AuditEvent JSON).  The order of the log is
the chain, not the ``seq`` column: a record that was edited no longer matches its hash; one that was
removed leaves its successor pointing at a hash that is nowhere; one that was inserted is skipped by
its successor's link; records moved around point at records that come later.  :func:`verify` names
the first such record.

A chain alone cannot tell a forged record *appended at the end* (or a cut tail) from a real one: for
that, every ``checkpoint_every`` records (and on demand, ``gateway audit checkpoint``) the gateway signs
``{seq, hash, at}`` with its key (ES256 JWS, joserfc).  A log shorter than its last checkpoint, or
whose record at a checkpoint's seq has another hash, was truncated or rewritten; a checkpoint whose
signature fails was forged.  What was appended after the last checkpoint is covered by the chain
only — :func:`verify` says how many records that is, and an auditor keeps the latest checkpoint
elsewhere (``--expect SEQ:HASH``) to close that gap.

Appends are serialised (the ``audit_head`` row is locked ``FOR UPDATE`` on PostgreSQL; SQLite has one
writer) and happen in the caller's transaction: an AuditEvent exists exactly when what it records does.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect, Engine

from gateway.dbapi import DriverSQL, bind_for, cursor_of
from gateway.seal import Signer

__all__ = [
    "GENESIS",
    "AuditLog",
    "Filters",
    "Problem",
    "Record",
    "Report",
    "digest",
    "index_of",
    "verify",
]

Json = dict[str, Any]
GENESIS = "0" * 64
_metadata = MetaData()
audit_table = Table(
    "audit_event",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False),
    Column("recorded", DateTime(timezone=True), nullable=False),
    Column("letter_id", String(64), nullable=True, index=True),
    Column("body", Text, nullable=False),
    # added by migration 0002 (nullable in the table, always written by append)
    Column("at", String(32), nullable=True, index=True),  # UTC, ISO 8601 with microseconds: sorts as it reads
    Column("patient", String(300), nullable=True, index=True),  # system|value
    Column("recipient", String(300), nullable=True, index=True),  # directory id, or the agent's reference/name
    Column("outcome", String(2), nullable=True),
    Column("kind", String(64), nullable=True),  # the first subtype code: disclose, receive, query, update...
    Column("prev_hash", String(64), nullable=True),
    Column("hash", String(64), nullable=True),
    # the AuditEvent JSON, zlib-compressed: ~9x smaller than the text, and what the hash covers
    # (``body`` is then empty; records written before the chain keep their JSON in ``body``)
    Column("zbody", LargeBinary, nullable=True),
)
head_table = Table(
    "audit_head",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)
checkpoint_table = Table(
    "audit_checkpoint",
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("at", String(32), nullable=False),
    Column("kid", String(128), nullable=False),
    Column("jws", Text, nullable=False),
)
# the statements of an append, built once (an append runs with every accepted letter and every batch)
_HEAD = select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == bindparam("head"))
_HEAD_LOCKED = _HEAD.with_for_update()  # PostgreSQL: appends from every process queue here, in commit order
_PATIENT_OF = (
    select(audit_table.c.patient)
    .where(and_(audit_table.c.letter_id == bindparam("letter"), audit_table.c.patient.is_not(None)))
    .limit(1)
)
_INSERT = audit_table.insert()
_INSERT_HEAD = head_table.insert()
_MOVE_HEAD = (
    update(head_table)
    .where(head_table.c.id == bindparam("head"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)


class _Writes:
    """The head read, the INSERT and the head move of an append, for the driver's cursor (:mod:`gateway.dbapi`):
    through SQLAlchemy they were a seventh of the CPU of a worker batch's ``finish_many`` on SQLite."""

    def __init__(self, dialect: Dialect) -> None:
        self.head = DriverSQL(_HEAD_LOCKED if dialect.name == "postgresql" else _HEAD, dialect)
        self.insert = DriverSQL(_INSERT, dialect)
        self.start = DriverSQL(_INSERT_HEAD, dialect)
        self.move = DriverSQL(_MOVE_HEAD, dialect)
        self.stamp = bind_for(audit_table.c.recorded, dialect)


@lru_cache(maxsize=16)
def _writes(dialect: Dialect) -> _Writes:
    return _Writes(dialect)


_PATIENT_ROLE = ("http://terminology.hl7.org/CodeSystem/object-role", "1")
_DESTINATION = "110152"


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(
    prev: str,
    id_: str,
    at: str,
    letter: str | None,
    patient: str | None,
    recipient: str | None,
    outcome: str | None,
    kind: str | None,
    content: bytes,
) -> str:
    """SHA-256 (hex) chaining one record to the previous one's hash: its search columns and its
    stored content bytes (the compressed AuditEvent)."""
    head = "\x1f".join((prev, id_, at, letter or "", patient or "", recipient or "", outcome or "", kind or ""))
    h = hashlib.sha256(head.encode())
    h.update(b"\x1e")
    h.update(content)
    return h.hexdigest()


def pack(event: Json) -> bytes:
    """What is stored (and hashed) of an AuditEvent: its JSON, zlib level 1 (fast; JSON with repeated
    code-system URLs shrinks ~9x)."""
    return zlib.compress(orjson.dumps(event), 1)


def unpack(zbody: bytes | None, body: str | None) -> Json:
    parsed: Json = orjson.loads(zlib.decompress(zbody) if zbody is not None else (body or "{}"))
    return parsed


def index_of(event: Json) -> tuple[str | None, str | None, str | None, str | None]:
    """(patient, recipient, outcome, kind) of an AuditEvent, as the search columns hold them."""
    patient = None
    for entity in event.get("entity") or ():
        role = entity.get("role") or {}
        ident = (entity.get("what") or {}).get("identifier") or {}
        if (role.get("system"), role.get("code")) == _PATIENT_ROLE and ident.get("value"):
            patient = f"{ident.get('system', '')}|{ident['value']}"
            break
    recipient = None
    for agent in event.get("agent") or ():
        codes = {c.get("code") for c in (agent.get("type") or {}).get("coding", ())}
        if _DESTINATION in codes:
            who = agent.get("who") or {}
            recipient = who.get("reference") or who.get("display")
            break
    subtypes = event.get("subtype") or ()
    kind = subtypes[0].get("code") if subtypes else None
    return patient, recipient, event.get("outcome"), kind


@dataclass(frozen=True, slots=True)
class Record:
    """One stored AuditEvent with its place in the chain."""

    seq: int
    id: str
    at: str
    letter_id: str | None
    patient: str | None
    recipient: str | None
    outcome: str | None
    kind: str | None
    prev_hash: str
    hash: str
    body: str
    zbody: bytes | None = None

    @property
    def event(self) -> Json:
        return unpack(self.zbody, self.body)


@dataclass(frozen=True, slots=True)
class Filters:
    """What ``GET /AuditEvent`` searches by (all optional, combined with AND)."""

    patient: str | None = None  # system|value, or a value alone
    recipient: str | None = None  # directory id (PractitionerRole-...) or reference (PractitionerRole/...)
    letter: str | None = None
    outcome: str | None = None
    since: str | None = None  # inclusive, UTC ISO (from date=ge.../gt...)
    until: str | None = None  # exclusive
    kind: str | None = None


class AuditLog:
    """Append to, read and check the chained log on one database (the outbox's)."""

    def __init__(
        self,
        engine: Engine,
        signer: Signer | None = None,
        *,
        checkpoint_every: int = 1000,
        reader: Engine | None = None,
    ) -> None:
        self.engine, self.signer, self.checkpoint_every = engine, signer, checkpoint_every
        self.reader = reader or engine

    # -- writing ----------------------------------------------------------------------------------
    def append(
        self,
        conn: Connection,
        events: Sequence[Json],
        now: datetime,
        *,
        letter_id: str | None = None,
        recipient: str | None = None,
    ) -> None:
        """Chain ``events`` to the log inside the caller's transaction (see :meth:`append_many`)."""
        self.append_many(conn, [(e, letter_id, recipient) for e in events], now)

    def record(self, events: Sequence[Json], now: datetime, *, letter_id: str | None = None) -> None:
        """Chain ``events`` in a transaction of their own (for what has no other write to join: a read of
        the audit, a refused call)."""
        with self.engine.begin() as conn:
            self.append(conn, events, now, letter_id=letter_id)

    def append_many(
        self, conn: Connection, items: Sequence[tuple[Json, str | None, str | None]], now: datetime
    ) -> None:
        """Chain (event, letter id, recipient id) items, in order, inside the caller's transaction.

        Everything that does not depend on the chain (index columns, compressed body, the patient of an
        acknowledgement) is done before the head is read: on PostgreSQL the head row stays locked until
        the caller commits, and every audit-writing transaction of every process waits for it."""
        if not items:
            return
        at = _stamp(now)
        staged = []
        patients: dict[str, str | None] = {}
        for event, letter_id, recipient in items:
            patient, agent, outcome, kind = index_of(event)
            if patient is None and letter_id is not None:
                if letter_id not in patients:  # an acknowledgement names the message, not the patient
                    patients[letter_id] = conn.execute(_PATIENT_OF, {"letter": letter_id}).scalar()
                patient = patients[letter_id]
            staged.append((str(event["id"]), letter_id, patient, recipient or agent, outcome, kind, pack(event)))
        sql = _writes(conn.dialect)
        with cursor_of(conn) as cursor:  # in the caller's transaction
            cursor.execute(sql.head.sql, sql.head.params({"head": 1}))
            head = cursor.fetchone()
            seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS)
            first = seq + 1
            recorded = sql.stamp(now)
            rows = []
            for id_, letter_id, patient, who, outcome, kind, zbody in staged:
                seq += 1
                current = digest(prev, id_, at, letter_id, patient, who, outcome, kind, zbody)
                rows.append(
                    {
                        "seq": seq,
                        "id": id_,
                        "recorded": recorded,
                        "letter_id": letter_id,
                        "body": "",
                        "zbody": zbody,
                        "at": at,
                        "patient": patient,
                        "recipient": who,
                        "outcome": outcome,
                        "kind": kind,
                        "prev_hash": prev,
                        "hash": current,
                    }
                )
                prev = current
            cursor.executemany(sql.insert.sql, [sql.insert.params(row) for row in rows])
            if head is None:
                cursor.execute(sql.start.sql, sql.start.params({"id": 1, "seq": seq, "hash": prev}))
            else:
                cursor.execute(sql.move.sql, sql.move.params({"head": 1, "new_seq": seq, "new_hash": prev}))
        if self.signer is not None and (seq // self.checkpoint_every) > ((first - 1) // self.checkpoint_every):
            self._checkpoint(conn, seq, prev, now)

    def _checkpoint(self, conn: Connection, seq: int, hash_: str, now: datetime) -> None:
        assert self.signer is not None
        at = _stamp(now)
        payload = orjson.dumps({"seq": seq, "hash": hash_, "at": at}, option=orjson.OPT_SORT_KEYS)
        token = jws.serialize_compact(
            {"alg": "ES256", "kid": self.signer.kid}, payload, self.signer.key, algorithms=["ES256"]
        )
        conn.execute(checkpoint_table.insert().values(seq=seq, hash=hash_, at=at, kid=self.signer.kid, jws=token))

    def checkpoint(self, now: datetime | None = None) -> tuple[int, str] | None:
        """Sign the current head now (the service does it periodically; ``gateway audit checkpoint``)."""
        if self.signer is None:
            raise ValueError("a checkpoint needs the gateway's signing key")
        with self.engine.begin() as conn:
            stmt = select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)
            if conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update()
            head = conn.execute(stmt).first()
            if head is None or head.seq == 0:
                return None
            done = conn.execute(select(checkpoint_table.c.seq).where(checkpoint_table.c.seq == head.seq)).scalar()
            if done is None:
                self._checkpoint(conn, int(head.seq), str(head.hash), now or datetime.now(UTC))
            return int(head.seq), str(head.hash)

    # -- reading ----------------------------------------------------------------------------------
    def _where(self, filters: Filters) -> list[Any]:
        c = audit_table.c
        clauses: list[Any] = []
        if filters.patient:
            if "|" in filters.patient:
                clauses.append(c.patient == filters.patient)
            else:
                clauses.append(c.patient.like(f"%|{_like(filters.patient)}", escape="\\"))
        if filters.recipient:
            wanted = {filters.recipient, filters.recipient.replace("/", "-", 1), filters.recipient.replace("-", "/", 1)}
            clauses.append(c.recipient.in_(sorted(wanted)))
        if filters.letter:
            clauses.append(c.letter_id == filters.letter)
        if filters.outcome:
            clauses.append(c.outcome == filters.outcome)
        if filters.kind:
            clauses.append(c.kind == filters.kind)
        if filters.since:
            clauses.append(c.at >= filters.since)
        if filters.until:
            clauses.append(c.at < filters.until)
        return clauses

    def search(self, filters: Filters, *, offset: int = 0, count: int = 50) -> tuple[int, list[Record]]:
        """(total matching, one page of records oldest first)."""
        where = self._where(filters)
        with self.reader.connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(audit_table).where(*where)).scalar() or 0)
            rows = conn.execute(
                select(*_COLUMNS).where(*where).order_by(audit_table.c.seq).offset(offset).limit(count)
            ).all()
        return total, [_record(r) for r in rows]

    def iterate(self, filters: Filters, batch: int = 2000) -> Iterator[Record]:
        """Every matching record, oldest first, read in batches (for exports)."""
        where = self._where(filters)
        last = 0
        while True:
            with self.reader.connect() as conn:
                rows = conn.execute(
                    select(*_COLUMNS).where(*where, audit_table.c.seq > last).order_by(audit_table.c.seq).limit(batch)
                ).all()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = rows[-1].seq

    def events(self, letter_id: str | None = None) -> list[Json]:
        stmt = select(audit_table.c.body, audit_table.c.zbody).order_by(audit_table.c.seq)
        if letter_id is not None:
            stmt = stmt.where(audit_table.c.letter_id == letter_id)
        with self.reader.connect() as conn:
            return [unpack(r.zbody, r.body) for r in conn.execute(stmt)]

    def checkpoints(self) -> list[tuple[int, str, str, str, str]]:
        with self.reader.connect() as conn:
            rows = conn.execute(select(checkpoint_table).order_by(checkpoint_table.c.seq)).all()
        return [(int(r.seq), str(r.hash), str(r.at), str(r.kid), str(r.jws)) for r in rows]


_COLUMNS = (
    audit_table.c.seq,
    audit_table.c.id,
    audit_table.c.at,
    audit_table.c.letter_id,
    audit_table.c.patient,
    audit_table.c.recipient,
    audit_table.c.outcome,
    audit_table.c.kind,
    audit_table.c.prev_hash,
    audit_table.c.hash,
    audit_table.c.body,
    audit_table.c.zbody,
)


def _record(row: Any) -> Record:
    return Record(
        int(row.seq), row.id, row.at or "", row.letter_id, row.patient, row.recipient, row.outcome, row.kind,
        row.prev_hash or "", row.hash or "", row.body, row.zbody,
    )  # fmt: skip


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- verifying ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    id: str
    kind: str  # edited | removed | inserted | reordered | truncated | forged-checkpoint | rewritten
    text: str


@dataclass(slots=True)
class Report:
    records: int = 0
    last_seq: int = 0
    head: str = GENESIS
    checkpoints: int = 0
    latest_checkpoint: tuple[int, str, str, str] | None = None  # seq, hash, at, kid
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        """Records after the latest checkpoint (covered by the chain only)."""
        return self.last_seq - (self.latest_checkpoint[0] if self.latest_checkpoint else 0)


_VERIFY_SQL = (
    "SELECT seq, id, at, letter_id, patient, recipient, outcome, kind, prev_hash, hash, zbody, body "
    "FROM audit_event ORDER BY seq"
)


def _rows(engine: Engine, batch: int = 5000) -> Iterable[tuple[Any, ...]]:
    """Raw DB-API rows: verifying 100k records a second leaves no room for an ORM layer per row."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(_VERIFY_SQL)
        while True:
            chunk = cursor.fetchmany(batch)
            if not chunk:
                break
            yield from chunk
        cursor.close()
    finally:
        raw.close()


def _check_token(token: str, keys: Sequence[ECKey]) -> Json | None:
    """The checkpoint's payload if one of ``keys`` signed it, else None."""
    for key in keys:
        try:
            payload: Json = orjson.loads(jws.deserialize_compact(token, key, algorithms=["ES256"]).payload)
            return payload
        except (JoseError, ValueError, orjson.JSONDecodeError):
            continue
    return None


def verify(engine: Engine, keys: Sequence[ECKey], *, expect: tuple[int, str] | None = None, limit: int = 20) -> Report:
    """Walk the whole log in ``seq`` order; the report's first problem names the first record that
    breaks the chain (or the checkpoint that shows a cut or a rewrite)."""
    report = Report()
    problems = report.problems
    seen: dict[str, int] = {GENESIS: 0}  # hash -> seq, of the records walked so far
    dangling: list[tuple[int, str, str, int]] = []  # (seq, id, link, previous seq) of links to nothing yet
    prev, last_seq = GENESIS, 0
    by_seq: dict[int, str] = {}
    walk: list[int] = [0]
    for seq, id_, at, letter, patient, recipient, outcome, kind, link, stored, zbody, body in _rows(engine):
        report.records += 1
        if stored is None or link is None:
            problems.append(
                Problem(seq, id_, "inserted", f"record {seq} ({id_}) has no chain hash: added outside the gateway")
            )
            continue
        content = bytes(zbody) if zbody is not None else str(body).encode()
        if digest(link, id_, at or "", letter, patient, recipient, outcome, kind, content) != stored:
            problems.append(
                Problem(seq, id_, "edited", f"record {seq} ({id_}) was edited: its content no longer matches its hash")
            )
        elif link != prev:
            if link in seen:
                first = walk[walk.index(seen[link]) + 1]
                problems.append(Problem(
                    first, id_, "inserted",
                    f"record {first} was inserted: record {seq} ({id_}) links past it, to record {seen[link]}",
                ))  # fmt: skip
            else:
                dangling.append((seq, id_, link, last_seq))
                problems.append(Problem(seq, id_, "pending", ""))
        seen[stored] = seq
        by_seq[seq] = stored
        walk.append(seq)
        prev, last_seq = stored, seq
    report.last_seq, report.head = last_seq, prev
    # a link to nothing walked before: to a record further on (moved), to an altered predecessor, or gone
    for seq, id_, link, before in dangling:
        i = next(n for n, p in enumerate(problems) if p.seq == seq and p.kind == "pending")
        if link in seen:
            text = f"record {seq} ({id_}) is out of order: in the chain it follows record {seen[link]}"
            problems[i] = Problem(seq, id_, "reordered", text)
        elif seq == before + 1:
            text = f"record {seq - 1} was altered and re-hashed (or replaced): record {seq} ({id_}) links to another version of it"
            problems[i] = Problem(seq - 1, id_, "edited", text)
        else:
            text = (
                f"record(s) removed before record {seq} ({id_}): it links to a record that is not in the log "
                f"(seq {before + 1}..{seq - 1} missing)"
            )
            problems[i] = Problem(seq, id_, "removed", text)
    with engine.connect() as conn:
        head = conn.execute(select(head_table.c.seq).where(head_table.c.id == 1)).scalar()
    if head is not None and int(head) > last_seq:
        problems.append(
            Problem(
                last_seq, "", "truncated", f"the log ends at seq {last_seq} but its head says {head}: records were cut"
            )
        )
    _check_checkpoints(engine, keys, report, by_seq, expect)
    problems.sort(key=lambda p: p.seq)
    del problems[limit:]
    return report


def _check_checkpoints(
    engine: Engine, keys: Sequence[ECKey], report: Report, by_seq: dict[int, str], expect: tuple[int, str] | None
) -> None:
    with engine.connect() as conn:
        rows = conn.execute(select(checkpoint_table).order_by(checkpoint_table.c.seq)).all()
    for row in rows:
        report.checkpoints += 1
        payload = _check_token(row.jws, keys)
        if payload is None or payload.get("seq") != row.seq or payload.get("hash") != row.hash:
            report.problems.append(
                Problem(
                    row.seq,
                    "",
                    "forged-checkpoint",
                    f"checkpoint at seq {row.seq}: not signed by a trusted gateway key",
                )
            )
            continue
        report.latest_checkpoint = (int(row.seq), str(row.hash), str(row.at), str(row.kid))
        _match(report, by_seq, int(row.seq), str(row.hash), f"the checkpoint signed at {row.at}")
    if expect is not None:
        _match(report, by_seq, expect[0], expect[1], "the checkpoint you kept")


def _match(report: Report, by_seq: dict[int, str], seq: int, hash_: str, what: str) -> None:
    if seq > report.last_seq:
        report.problems.append(
            Problem(
                seq,
                "",
                "truncated",
                f"the log ends at seq {report.last_seq} but {what} covers seq {seq}: records were cut",
            )
        )
    elif by_seq.get(seq) != hash_:
        report.problems.append(
            Problem(seq, "", "rewritten", f"record {seq} differs from {what}: the log up to it was rewritten")
        )
