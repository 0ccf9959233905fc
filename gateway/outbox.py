"""The transactional outbox: letters, their per-recipient deliveries, and the audit, in one database.

A letter is accepted only once this module has committed it together with one delivery row per
routed recipient and the audit events of that decision — in a single transaction, so a crash at any
point leaves either everything or nothing.  Workers then *claim* due deliveries (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so several gateway processes share the work without sending a message twice;
SQLite serialises writers), build the message at send time with the consents valid then, and record
each attempt.

Delivery states: ``queued`` → ``sending`` (claimed) → ``acknowledged`` | ``sent`` (handed to a store-and-forward
transport such as MSSanté SMTP; the acknowledgement — an MDN — arrives later and moves it to
``acknowledged`` or ``dead-lettered``) | ``failed-retrying`` (back to due later) | ``dead-lettered``
(retries exhausted or a permanent refusal; replayable) | ``withheld`` (consent allows nothing at send time).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import IntegrityError

from gateway import audit, migrate
from gateway.auditlog import AuditLog
from gateway.dbapi import DriverSQL, bind_for, cursor_of, read_for
from gateway.logs import get_logger
from gateway.metrics import Metrics, refusal_reason
from gateway.seal import Signer
from gateway.store import reader_for
from gateway.translate.ids import resource_id

__all__ = ["STATES", "UNACKNOWLEDGED", "Delivery", "Finish", "Outbox"]

UNACKNOWLEDGED = "no acknowledgement within"  # last_error of a delivery whose receipt never came
STATES = ("queued", "sending", "sent", "acknowledged", "failed-retrying", "dead-lettered", "withheld")
_log = get_logger("gateway.outbox")
_metadata = MetaData()
_letters = Table(
    "letter",
    _metadata,
    Column("id", String(64), primary_key=True),
    Column("document_key", String(512), nullable=False, unique=True),  # system|value of the letter's id
    Column("set_key", String(512), nullable=True),
    Column("version", Integer, nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("client", String(128), nullable=False),
    Column("media_type", String(64), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("replaces", String(64), nullable=True),  # an earlier letter id of the same set
    # the earlier and later versions of a set, looked up at every accept (migration 0004)
    Index("ix_letter_set_key_version", "set_key", "version"),
    # the letters whose content is still kept, oldest first: what the retention erases (migration 0006)
    Index(
        "ix_letter_kept",
        "received_at",
        sqlite_where=text("length(body) > 0"),
        postgresql_where=text("length(body) > 0"),
    ),
)
_deliveries = Table(
    "delivery",
    _metadata,
    Column("message_id", String(64), primary_key=True),  # MessageHeader.id, the same on every retry
    Column("letter_id", String(64), ForeignKey("letter.id"), nullable=False),
    Column("recipient_id", String(256), nullable=False),
    Column("recipient_ref", String(512), nullable=False),
    Column("endpoint", String(1024), nullable=False),
    Column("status", String(32), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("replaces", String(64), nullable=True),  # message id of the earlier version's delivery
    Column("queued_at", DateTime(timezone=True), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),  # last hand-over to the transport
    Column("acknowledged_at", DateTime(timezone=True), nullable=True),
    # "letter", or "withdrawal": tells a recipient of an earlier version that the new one is not for it
    Column("kind", String(16), nullable=False, default="letter", server_default="letter"),
    # a letter's deliveries in one status (the claim of a held letter's deliveries); the due ones, in
    # order (the claim of what is due): neither reads deliveries that are not wanted (migration 0004)
    Index("ix_delivery_letter_status", "letter_id", "status"),
    Index("ix_delivery_status_due", "status", "due_at"),
    # one state's deliveries in the order they last changed: GET /deliveries?status= pages (migration 0007)
    Index("ix_delivery_status_updated", "status", "updated_at", "message_id"),
)


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str
    letter_id: str
    recipient_id: str
    recipient_ref: str
    endpoint: str
    status: str
    attempts: int
    due_at: datetime
    updated_at: datetime
    last_error: str | None
    replaces: str | None
    queued_at: datetime | None = None
    sent_at: datetime | None = None
    acknowledged_at: datetime | None = None
    kind: str = "letter"


@dataclass(frozen=True, slots=True)
class Finish:
    """One attempt's outcome, to record (see :meth:`Outbox.finish_many`)."""

    message_id: str
    letter_id: str
    status: str
    recipient_id: str | None = None
    error: str | None = None
    due_at: datetime | None = None
    audit_events: Sequence[dict[str, Any]] = ()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _maybe(value: datetime | None) -> datetime | None:
    return _aware(value) if value is not None else None


def _delivery(row: Any) -> Delivery:
    return Delivery(
        row.message_id,
        row.letter_id,
        row.recipient_id,
        row.recipient_ref,
        row.endpoint,
        row.status,
        row.attempts,
        _aware(row.due_at),
        _aware(row.updated_at),
        row.last_error,
        row.replaces,
        _maybe(row.queued_at),
        _maybe(row.sent_at),
        _maybe(row.acknowledged_at),
        row.kind,
    )


# per status reached: a hand-over stamps sent_at, an acknowledgement acknowledged_at as well
_STAMPS: dict[str, tuple[str, ...]] = {"sent": ("sent_at",), "acknowledged": ("sent_at", "acknowledged_at")}


@lru_cache(maxsize=64)
def _finish_group(stamps: tuple[str, ...], count: int) -> Any:
    """The UPDATE recording ``count`` attempts with the same outcome at once (bound ``m0``..): each row
    only if this worker still holds its claim; ``stamps`` are the columns set to the attempt's time too.
    The ids it recorded come back (a row whose claim was lost is not among them)."""
    claimed = and_(
        _deliveries.c.message_id.in_([bindparam(f"m{i}") for i in range(count)]),
        _deliveries.c.claimed_by == bindparam("w"),
        _deliveries.c.status == "sending",
    )
    return (
        update(_deliveries)
        .where(claimed)
        .values(
            status=bindparam("s"),
            attempts=_deliveries.c.attempts + 1,
            updated_at=bindparam("t"),
            last_error=bindparam("e"),
            due_at=bindparam("d"),
            claimed_by=None,
            claimed_at=None,
            **{column: bindparam("t") for column in stamps},
        )
        .returning(_deliveries.c.message_id)
    )


@lru_cache(maxsize=64)
def _finish_sql(stamps: tuple[str, ...], count: int, dialect: Dialect) -> tuple[DriverSQL, Callable[[datetime], Any]]:
    """:func:`_finish_group` for the driver's cursor (:mod:`gateway.dbapi`), and how its times are bound:
    executed through SQLAlchemy it cost a worker batch's ``finish_many`` ~8% more CPU."""
    return DriverSQL(_finish_group(stamps, count), dialect), bind_for(_deliveries.c.updated_at, dialect)


# statements the hot path runs, built once: building and hashing a statement per call costs more than
# running it (the values travel as bound parameters)
_FIND_LETTER = select(_letters.c.id).where(_letters.c.document_key == bindparam("key"))
_EARLIER = (
    select(_letters.c.id)
    .where(and_(_letters.c.set_key == bindparam("set_key"), _letters.c.version < bindparam("version")))
    .order_by(_letters.c.version.desc())
)
_LATER = (
    select(_letters.c.version)
    .where(and_(_letters.c.set_key == bindparam("set_key"), _letters.c.version > bindparam("version")))
    .order_by(_letters.c.version.desc())
)
_INSERT_LETTER = _letters.insert()
_INSERT_DELIVERY = _deliveries.insert()
_PENDING = _deliveries.c.status.in_([bindparam("queued", "queued"), bindparam("retrying", "failed-retrying")])
_DUE = or_(  # an IN of fixed parameters, not an "expanding" one: those are re-rendered at every execution
    and_(_PENDING, _deliveries.c.due_at <= bindparam("now")),
    and_(_deliveries.c.status == "sending", _deliveries.c.claimed_at < bindparam("expired")),
)
# a letter's deliveries (due together) side by side: a claim takes whole letters, each translated once
_PICK_DUE = select(_deliveries.c.message_id).where(_DUE).order_by(_deliveries.c.due_at, _deliveries.c.letter_id)
_ANY_DUE = _PICK_DUE.limit(1)
_RENEW_HOLD = (  # see Outbox.renew_hold
    update(_deliveries)
    .where(
        and_(
            _deliveries.c.status == "queued",
            _deliveries.c.claimed_by == bindparam("holder"),
            _deliveries.c.queued_at > bindparam("since"),
        )
    )
    .values(due_at=bindparam("until"))
)


@lru_cache(maxsize=32)
def _claim_statement(letters: int, lock: bool) -> Any:
    """The claim (pick, mark ``sending``, read back): of due deliveries (``letters`` 0), or of the queued
    deliveries of ``letters`` letters (bound ``l0``..); ``lock``: PostgreSQL's ``FOR UPDATE SKIP LOCKED``."""
    if letters:
        due = and_(
            _deliveries.c.status == "queued",
            _deliveries.c.letter_id.in_([bindparam(f"l{i}") for i in range(letters)]),
        )
        # no ORDER BY: it would lead SQLite to walk every queued delivery in due order, through the
        # status index, instead of these letters' few through theirs (the caller sorts what it gets)
        pick = select(_deliveries.c.message_id).where(due)
    else:
        due, pick = _DUE, _PICK_DUE
    pick = pick.limit(bindparam("limit", type_=Integer))
    if lock:
        pick = pick.with_for_update(skip_locked=True)  # workers in other processes skip what this one takes
    picked = pick.cte("picked")  # a CTE runs once: a subquery could be rescanned per row and take more
    return (
        update(_deliveries)
        .where(and_(_deliveries.c.message_id.in_(select(picked.c.message_id)), due))
        .values(
            status="sending", claimed_by=bindparam("worker"), claimed_at=bindparam("at"), updated_at=bindparam("at")
        )
        .returning(*_deliveries.c)
    )


class _Fast:
    """An accept's letter lookup and INSERTs, the claim and the idle poll's look, for the driver's cursor
    (:mod:`gateway.dbapi`): SQLAlchemy's execution of them was a fifth of an accept's CPU and a third of a
    claim's or a poll's (``bench_deliver.py --compare``).  A claimed row is read back as SQLAlchemy reads
    it (:func:`_delivery`): its times parsed (SQLite) and aware."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.find = DriverSQL(_FIND_LETTER, dialect)
        self.letter = DriverSQL(_INSERT_LETTER, dialect)
        self.deliveries = DriverSQL(_INSERT_DELIVERY, dialect)
        self.any_due = DriverSQL(_ANY_DUE, dialect)
        self.stamp = bind_for(_deliveries.c.due_at, dialect)  # every time column is DateTime(timezone=True)
        self.body = bind_for(_letters.c.body, dialect)
        # a claimed row (every column, in the table's order) → Delivery's fields, times made aware
        position = {column.name: i for i, column in enumerate(_deliveries.c)}
        self._fields = [(position[f.name], self._reader(_deliveries.c[f.name])) for f in fields(Delivery)]

    def _reader(self, column: Column[Any]) -> Callable[[Any], Any] | None:
        read = read_for(column, self.dialect)
        if not isinstance(column.type, DateTime):
            return read
        return _maybe if read is None else lambda value: _maybe(read(value))

    def delivery(self, row: Sequence[Any]) -> Delivery:
        return Delivery(*[row[i] if read is None else read(row[i]) for i, read in self._fields])


@lru_cache(maxsize=16)
def _fast(dialect: Dialect) -> _Fast:
    return _Fast(dialect)


@lru_cache(maxsize=32)
def _claim_sql(letters: int, dialect: Dialect) -> DriverSQL:
    """:func:`_claim_statement` for the driver's cursor (PostgreSQL's with its ``FOR UPDATE SKIP LOCKED``)."""
    return DriverSQL(_claim_statement(letters, dialect.name == "postgresql"), dialect)


class Outbox:
    def __init__(
        self,
        engine: Engine,
        signer: Signer | None = None,
        *,
        checkpoint_every: int = 1000,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        migrate.upgrade(engine)
        self.reader = reader_for(engine)  # status and audit reads never queue behind a commit
        # the audit is chained in the same transactions as what it records; ``signer`` signs checkpoints
        self.log = AuditLog(engine, signer, checkpoint_every=checkpoint_every, reader=self.reader)
        # counted where it happens (accepted, refused, each attempt), whichever door or worker did it
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(self)
        # the delivery worker of this process, which holds what it accepts (see accept and renew_hold)
        self.holder: str | None = None

    # -- accepting --------------------------------------------------------------------------------
    def find_letter(self, document_key: str) -> str | None:
        with self.reader.connect() as conn:
            found = conn.execute(select(_letters.c.id).where(_letters.c.document_key == document_key)).scalar()
            return str(found) if found else None

    def accept(
        self,
        *,
        document_key: str,
        set_key: str | None,
        version: int | None,
        client: str,
        media_type: str,
        body: bytes,
        deliveries: Sequence[tuple[str, str, str, str]],  # (message id, recipient id, recipient ref, endpoint)
        audit_events: Sequence[dict[str, Any]],
        now: datetime,
        source: str = "http",
        hold: timedelta = timedelta(0),
    ) -> tuple[str, bool]:
        """Store a letter, its deliveries and its audit in one transaction; (letter id, created?).

        ``source`` names the door it came in by (``http``, ``mllp``...) for the metrics.  ``hold``: the
        deliveries fall due for every worker only that long after now — the accepting process, which
        holds the translation, claims them at once by letter (:meth:`claim` ``letters=``); another
        process takes them after ``hold`` if this one died.  With a :attr:`holder`, they are marked as
        its own, and it extends the hold while it lives (:meth:`renew_hold`)."""
        try:
            with self.engine.begin() as conn:
                sql = _fast(conn.dialect)
                with cursor_of(conn) as cursor:  # in this transaction
                    cursor.execute(sql.find.sql, sql.find.params({"key": document_key}))
                    existing = cursor.fetchone()
                if existing:
                    return str(existing[0]), False
                earlier = later = None
                if set_key is not None and version is not None:
                    earlier = conn.execute(_EARLIER, {"set_key": set_key, "version": version}).scalar()
                    later = conn.execute(_LATER, {"set_key": set_key, "version": version}).scalar()
                letter_id = str(uuid.uuid4())
                stamp = sql.stamp(now)
                letter = {
                    "id": letter_id,
                    "document_key": document_key,
                    "set_key": set_key,
                    "version": version,
                    "received_at": stamp,
                    "client": client,
                    "media_type": media_type,
                    "body": sql.body(body),
                    "replaces": earlier,
                }
                with cursor_of(conn) as cursor:
                    cursor.execute(sql.letter.sql, sql.letter.params(letter))
                left = self._supersede(conn, earlier, version, now) if earlier else {}
                replaced = {recipient: sent[0] for recipient, sent in left.items()}
                stale = f"superseded: version {later} of this letter was received first" if later else None
                routed = {recipient_id for _, recipient_id, _, _ in deliveries}
                withdrawals = [
                    (
                        resource_id("MessageHeader", document_key, recipient_id, "withdrawal"),
                        recipient_id,
                        ref,
                        endpoint,
                    )
                    for recipient_id, (_, ref, endpoint) in sorted(left.items())
                    if recipient_id not in routed and not stale
                ]  # had an earlier version, not addressed by this one: told to set it aside
                if deliveries or withdrawals:
                    status, due_at = "withheld" if stale else "queued", now + hold
                    holder = self.holder if hold and not stale else None
                    due = sql.stamp(due_at)
                    rows = [
                        sql.deliveries.params(
                            {
                                "message_id": message_id,
                                "letter_id": letter_id,
                                "recipient_id": recipient_id,
                                "recipient_ref": recipient_ref,
                                "endpoint": endpoint,
                                "status": status,
                                "attempts": 0,
                                "due_at": due,
                                "updated_at": stamp,
                                "queued_at": stamp,
                                "last_error": stale,
                                "claimed_by": holder,
                                "claimed_at": None,
                                "sent_at": None,
                                "acknowledged_at": None,
                                "kind": kind,
                                "replaces": replaced.get(recipient_id),
                            }
                        )
                        for kind, batch in (("letter", deliveries), ("withdrawal", withdrawals))
                        for message_id, recipient_id, recipient_ref, endpoint in batch
                    ]
                    with cursor_of(conn) as cursor:
                        cursor.executemany(sql.deliveries.sql, rows)
                self._append_audit(conn, audit_events, letter_id, now)
        except IntegrityError:
            # the same letter pushed twice at once (a HIS resending after its timeout): both looked, both
            # inserted, the unique document key let one through; the other answers as for a resend
            raced = self.find_letter(document_key)
            if raced is None:
                raise
            return raced, False
        self.metrics.letter_accepted(source)
        _log.info(
            "letter accepted",
            letter_id=letter_id,
            source=source,
            client=client,
            recipients=len(deliveries),
            replaces=earlier,
            stale=bool(stale),
        )
        return letter_id, True

    def _supersede(
        self, conn: Connection, letter_id: str, version: int | None, now: datetime
    ) -> dict[str, tuple[str, str, str]]:
        """A new version arrived: cancel what of the earlier one has not left yet; what left is replaced.

        Returns, per recipient, (the message id the new message must reference, recipient reference,
        endpoint) — only for messages that were handed over or may be in flight: a message never sent
        needs no replacement, it is withheld.
        """
        rows = conn.execute(
            select(
                _deliveries.c.recipient_id,
                _deliveries.c.message_id,
                _deliveries.c.status,
                _deliveries.c.recipient_ref,
                _deliveries.c.endpoint,
            ).where(and_(_deliveries.c.letter_id == letter_id, _deliveries.c.kind == "letter"))
        ).all()
        pending = [r.message_id for r in rows if r.status in ("queued", "failed-retrying", "dead-lettered")]
        if pending:
            conn.execute(
                update(_deliveries)
                .where(and_(_deliveries.c.message_id.in_(pending), _deliveries.c.status != "sending"))
                .values(
                    status="withheld",
                    updated_at=now,
                    last_error=f"superseded by version {version} before it left",
                    claimed_by=None,
                )
            )
        return {
            r.recipient_id: (r.message_id, r.recipient_ref, r.endpoint)
            for r in rows
            if r.status in ("sending", "sent", "acknowledged")
        }

    def _append_audit(
        self,
        conn: Connection,
        events: Sequence[dict[str, Any]],
        letter_id: str | None,
        now: datetime,
        recipient: str | None = None,
    ) -> None:
        self.log.append(conn, events, now, letter_id=letter_id, recipient=recipient)

    def audit(
        self, events: Sequence[dict[str, Any]], letter_id: str | None = None, now: datetime | None = None
    ) -> None:
        self.log.record(events, now or datetime.now(UTC), letter_id=letter_id)
        for event in events:
            reason = refusal_reason(event)
            if reason is not None:  # a letter refused at the door: counted and logged by its issue code only
                self.metrics.letter_refused(reason)
                _log.info("letter refused", reason=reason)

    def audit_events(self, letter_id: str | None = None) -> list[dict[str, Any]]:
        return self.log.events(letter_id)

    # -- reading ----------------------------------------------------------------------------------
    def letter(self, letter_id: str) -> dict[str, Any] | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(_letters).where(_letters.c.id == letter_id)).first()
            if row is None:
                return None
            deliveries = conn.execute(
                select(_deliveries).where(_deliveries.c.letter_id == letter_id).order_by(_deliveries.c.recipient_id)
            )
            return {
                "id": row.id,
                "document": row.document_key,
                "version": row.version,
                "replaces": row.replaces,
                "received": _aware(row.received_at).isoformat(),
                "client": row.client,
                "deliveries": [_delivery(d) for d in deliveries],
            }

    def erase_letters(self, received_before: datetime, now: datetime, retention: str, limit: int = 500) -> list[str]:
        """Erase the bodies of letters received before ``received_before`` whose every delivery is final
        (acknowledged or withheld: nothing can send or replay them again); the ids erased, each with an
        AuditEvent (``retention``: the period, as the event says it).  What a letter was (ids, set,
        version, deliveries, audit) is kept; its content is not.  A letter with a delivery still under way,
        awaiting a receipt or dead-lettered (replayable) keeps its body until that delivery is final."""
        unfinished = select(_deliveries.c.letter_id).where(
            and_(_deliveries.c.letter_id == _letters.c.id, _deliveries.c.status.notin_(("acknowledged", "withheld")))
        )
        due = (
            select(_letters.c.id)
            .where(and_(_letters.c.received_at < received_before, text("length(letter.body) > 0")))
            .where(~unfinished.exists())
            .order_by(_letters.c.received_at)
            .limit(limit)
        )
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                due = due.with_for_update(of=_letters, skip_locked=True)  # two gateways never erase one twice
            erased = [str(rid) for rid in conn.execute(due).scalars()]
            if not erased:
                return []
            conn.execute(update(_letters).where(_letters.c.id.in_(erased)).values(body=b""))
            recorded = now.isoformat(timespec="seconds")
            events = [(audit.erasure_event(rid, recorded, retention), rid, None) for rid in erased]
            self.log.append_many(conn, events, now)
        _log.info("letters erased", count=len(erased))
        return erased

    def letter_body(self, letter_id: str) -> tuple[bytes, str] | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(_letters.c.body, _letters.c.media_type).where(_letters.c.id == letter_id)).first()
            return (bytes(row.body), str(row.media_type)) if row else None

    # -- delivering -------------------------------------------------------------------------------
    def claim(
        self,
        worker: str,
        now: datetime,
        limit: int = 10,
        lease: timedelta = timedelta(minutes=2),
        letters: Collection[str] = (),
    ) -> list[Delivery]:
        """Due deliveries, marked ``sending`` by this worker (a crashed worker's lease expires).

        ``letters``: instead, the queued deliveries of these letters, due or held (see :meth:`accept`)."""
        sql = _fast(self.engine.dialect)
        params: dict[str, Any] = {"worker": worker, "at": sql.stamp(now), "limit": limit}
        if letters:
            params.update((f"l{i}", letter) for i, letter in enumerate(letters))
        else:
            due = {"now": sql.stamp(now), "expired": sql.stamp(now - lease)}
            params.update(due)
            # an idle poll reads, and writes nothing (no write lock, no commit)
            with self.reader.connect() as conn, cursor_of(conn) as cursor:
                cursor.execute(sql.any_due.sql, sql.any_due.params(due))
                if cursor.fetchone() is None:
                    return []
        claim = _claim_sql(len(letters), self.engine.dialect)
        with self.engine.begin() as conn, cursor_of(conn) as cursor:  # one statement: pick, mark and read back
            cursor.execute(claim.sql, claim.params(params))
            claimed = [sql.delivery(row) for row in cursor.fetchall()]
        return sorted(claimed, key=lambda d: (d.due_at, d.message_id))

    def renew_hold(self, holder: str, until: datetime, since: datetime) -> int:
        """The holder is alive: its queued deliveries accepted after ``since`` stay held until ``until``
        (how many).  A holder that dies stops renewing, and others take its deliveries when the last hold
        ends; one alive but behind keeps only its recent ones (older ones any idle worker takes)."""
        with self.engine.begin() as conn:
            return int(conn.execute(_RENEW_HOLD, {"holder": holder, "until": until, "since": since}).rowcount)

    def finish(
        self,
        message_id: str,
        worker: str,
        status: str,
        now: datetime,
        *,
        error: str | None = None,
        due_at: datetime | None = None,
        audit_events: Sequence[dict[str, Any]] = (),
    ) -> bool:
        """Record an attempt's outcome (only by the worker holding the claim); False if it lost the claim."""
        with self.reader.connect() as conn:
            letter_id = conn.execute(select(_deliveries.c.letter_id).where(_deliveries.c.message_id == message_id))
            found = letter_id.scalar()
        finish = Finish(message_id, str(found or ""), status, None, error, due_at, audit_events)
        return self.finish_many([finish], worker, now)[0]

    def finish_many(self, outcomes: Sequence[Finish], worker: str, now: datetime) -> list[bool]:
        """Record a batch of attempts in one transaction (one commit, one fsync, for a worker's batch).

        Each is recorded only if this worker still holds its claim (False otherwise: its lease expired
        and another worker took it over).  A crash before this commit loses only the record, never the
        message: the lease expires, the message is sent again under the same ``MessageHeader.id``, and
        the receiver's de-duplication answers as the first time.
        """
        # one UPDATE per distinct outcome (status, error, next due time) — usually one for the whole batch
        batches: dict[tuple[str, str | None, datetime], list[int]] = {}
        for i, outcome in enumerate(outcomes):
            assert outcome.status in STATES
            batches.setdefault((outcome.status, outcome.error, outcome.due_at or now), []).append(i)
        groups = list(batches.items())
        if len({o.message_id for o in outcomes}) < len(outcomes):  # the same delivery twice: one at a time, in order
            groups = [(key, [i]) for key, indices in groups for i in indices]
            groups.sort(key=lambda group: group[1][0])
        done = [False] * len(outcomes)
        with self.engine.begin() as conn:
            for (status, error, due_at), indices in groups:
                sql, stamp = _finish_sql(_STAMPS.get(status, ()), len(indices), conn.dialect)
                params: dict[str, Any] = {"w": worker, "s": status, "t": stamp(now), "e": error, "d": stamp(due_at)}
                params.update((f"m{n}", outcomes[i].message_id) for n, i in enumerate(indices))
                with cursor_of(conn) as cursor:  # in this transaction
                    cursor.execute(sql.sql, sql.params(params))
                    recorded = {row[0] for row in cursor.fetchall()}
                for i in indices:
                    done[i] = outcomes[i].message_id in recorded
            audited = [
                (event, outcome.letter_id, outcome.recipient_id)
                for outcome, ok in zip(outcomes, done, strict=True)
                if ok
                for event in outcome.audit_events
            ]
            self.log.append_many(conn, audited, now)
        for outcome, ok in zip(outcomes, done, strict=True):
            if ok:
                self.metrics.attempt_recorded(outcome.status)
        return done

    def acknowledge(
        self,
        message_id: str,
        ok: bool,
        now: datetime,
        *,
        detail: str | None = None,
        audit_events: Sequence[dict[str, Any]] = (),
    ) -> bool:
        """An acknowledgement that arrives after the hand-over (an MDN, an asynchronous response message).

        ``ok`` moves a ``sent`` delivery to ``acknowledged``; a negative acknowledgement dead-letters it
        (the recipient refused it: resending unchanged would not help; replay after fixing).  Only a
        delivery that was handed over can be acknowledged; a repeated acknowledgement changes nothing
        (returns False) so duplicated MDNs are harmless.
        """
        status = "acknowledged" if ok else "dead-lettered"
        awaiting = _deliveries.c.status == "sent"
        if ok:  # a receipt arriving after the wait was given up still proves the delivery
            late = and_(_deliveries.c.status == "dead-lettered", _deliveries.c.last_error.like(f"{UNACKNOWLEDGED}%"))
            awaiting = or_(awaiting, late)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(_deliveries)
                .where(and_(_deliveries.c.message_id == message_id, awaiting))
                .values(
                    status=status,
                    updated_at=now,
                    last_error=None if ok else detail,
                    **({"acknowledged_at": now} if ok else {}),
                )
            )
            if result.rowcount != 1:
                return False
            self._audit_delivery(conn, message_id, audit_events, now)
        if not ok:
            self.metrics.dead_letters.inc()
        _log.info("acknowledgement applied", message_id=message_id, outcome=status)
        return True

    def expire_unacknowledged(
        self, now: datetime, wait: timedelta, event: Callable[[str, str, str], dict[str, Any]], limit: int = 500
    ) -> list[str]:
        """Dead-letter the deliveries handed over (``sent``) longer than ``wait`` ago with no acknowledgement
        — a lost MDN, a relay that dropped the mail — so that an operator sees them (dead letters, metrics)
        and replays them (same MessageHeader.id: the receiver drops a duplicate).  ``event(message id,
        recipient ref, detail)`` is the AuditEvent of each; a receipt arriving later still acknowledges."""
        detail = f"{UNACKNOWLEDGED} {wait.total_seconds():.0f} s of the hand-over"
        expired: list[str] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(_deliveries.c.message_id, _deliveries.c.recipient_ref)
                .where(and_(_deliveries.c.status == "sent", _deliveries.c.sent_at <= now - wait))
                .order_by(_deliveries.c.sent_at)
                .limit(limit)
            ).all()
            for row in rows:
                done = conn.execute(
                    update(_deliveries)
                    .where(and_(_deliveries.c.message_id == row.message_id, _deliveries.c.status == "sent"))
                    .values(status="dead-lettered", updated_at=now, last_error=detail)
                )
                if done.rowcount == 1:
                    self._audit_delivery(conn, row.message_id, [event(row.message_id, row.recipient_ref, detail)], now)
                    expired.append(row.message_id)
        for message_id in expired:
            self.metrics.dead_letters.inc()
            _log.warning("no acknowledgement: dead-lettered", message_id=message_id)
        return expired

    def _audit_delivery(
        self, conn: Connection, message_id: str, events: Sequence[dict[str, Any]], now: datetime
    ) -> None:
        """Audit a delivery's change in the same transaction as the change (filed under its letter)."""
        row = conn.execute(
            select(_deliveries.c.letter_id, _deliveries.c.recipient_id).where(_deliveries.c.message_id == message_id)
        ).first()
        self._append_audit(conn, events, row.letter_id if row else None, now, row.recipient_id if row else None)

    def replay(self, message_id: str, now: datetime) -> bool:
        """Put a dead-lettered delivery back in the queue."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(_deliveries)
                .where(and_(_deliveries.c.message_id == message_id, _deliveries.c.status == "dead-lettered"))
                .values(status="queued", due_at=now, updated_at=now, queued_at=now, attempts=0, last_error=None)
            )
            return result.rowcount == 1

    def counts(self, now: datetime) -> tuple[dict[str, int], int]:
        """Deliveries per status (every status, 0 included) and how many are due at ``now`` — for the
        metrics, at each scrape: one GROUP BY (the status index covers it) and one count of what is due
        (the pending rows only)."""
        pending = _deliveries.c.status.in_(("queued", "failed-retrying"))
        with self.reader.connect() as conn:
            rows = conn.execute(select(_deliveries.c.status, func.count()).group_by(_deliveries.c.status)).all()
            due = conn.execute(
                select(func.count()).select_from(_deliveries).where(and_(pending, _deliveries.c.due_at <= now))
            ).scalar()
        by_status = dict.fromkeys(STATES, 0)
        by_status.update({str(status): int(count) for status, count in rows})
        return by_status, int(due or 0)

    def delivery(self, message_id: str) -> Delivery | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(_deliveries).where(_deliveries.c.message_id == message_id)).first()
        return _delivery(row) if row is not None else None

    def deliveries(
        self, status: str | None = None, *, limit: int | None = None, after: tuple[datetime, str] | None = None
    ) -> list[Delivery]:
        """Deliveries (in one ``status``, or all) in the order they last changed, then by message id.

        ``limit`` and ``after`` (the ``(updated_at, message_id)`` of the last one seen) page through them:
        keyset paging, so that a page of one state is read from ``ix_delivery_status_updated`` and costs
        the same on the thousandth page as on the first (the unfiltered listing sorts every delivery).
        """
        stmt = select(_deliveries).order_by(_deliveries.c.updated_at, _deliveries.c.message_id)
        if status is not None:
            stmt = stmt.where(_deliveries.c.status == status)
        if after is not None:
            changed, message_id = after
            stmt = stmt.where(
                or_(
                    _deliveries.c.updated_at > changed,
                    and_(_deliveries.c.updated_at == changed, _deliveries.c.message_id > message_id),
                )
            )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.reader.connect() as conn:
            return [_delivery(r) for r in conn.execute(stmt)]
