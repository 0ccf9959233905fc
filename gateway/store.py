"""Versioned FHIR resources in SQL: consents, legal representatives and the actor directory.

SQLite by default (a file, no set-up), PostgreSQL with a ``postgresql+psycopg://`` URL, through
SQLAlchemy Core.  Every write is a new version row — nothing is updated in place or deleted — so a
decision taken at any past instant can be explained with the versions valid then (``meta.versionId``
and ``meta.lastUpdated`` are set here, never trusted from the client).
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url

from gateway import migrate
from gateway.consent import ConsentVersion, PatientIndex, PatientKey, _instant, about_patient
from gateway.directory import Directory
from gateway.policy import Policy

__all__ = [
    "DIRECTORY_TYPES",
    "ConsentSnapshot",
    "ResourceStore",
    "SqlConsentStore",
    "StoreSnapshot",
    "directory_from_store",
    "make_engine",
    "reader_for",
]

Json = dict[str, Any]
DIRECTORY_TYPES = ("Organization", "Practitioner", "PractitionerRole", "Endpoint")
STORED_TYPES = (*DIRECTORY_TYPES, "Consent", "RelatedPerson")

_metadata = MetaData()
_versions = Table(
    "resource_version",
    _metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", Text, nullable=False),
    # the type's write counter (resource_change) as this write left it: what changed since a snapshot
    # was read is what has a higher number (none before migration 0005: a snapshot reads those whole)
    Column("change_no", Integer, nullable=True),
    Index("ix_resource_version_change", "resource_type", "change_no"),
)
# how many times each type was written: bumped in the writing transaction, read per letter and per batch
# by StoreSnapshot to tell whether anything changed (counting the versions instead read them all: ~6 ms
# per call at 100,000 stored consents, on SQLite) (migration 0005)
_changes = Table(
    "resource_change",
    _metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("changes", Integer, nullable=False),
)
_CHANGES = "SELECT resource_type, changes FROM resource_change"
# one statement on SQLite and PostgreSQL alike, run before the write it numbers: concurrent writers of a
# type queue on its row until commit, so its numbers become visible in order (no reader sees 12 before 11)
_CHANGED = text(
    "INSERT INTO resource_change (resource_type, changes) VALUES (:resource_type, 1) "
    "ON CONFLICT (resource_type) DO UPDATE SET changes = resource_change.changes + 1 RETURNING changes"
)
_HOLD = text(  # the counter's row lock without counting a write (a missing row starts at 0)
    "INSERT INTO resource_change (resource_type, changes) VALUES (:resource_type, 0) "
    "ON CONFLICT (resource_type) DO UPDATE SET changes = resource_change.changes"
)


def make_engine(url: str) -> Engine:
    """The database engine: SQLite waits for a busy writer instead of failing (API and worker share it).

    A plain ``postgresql://`` (or ``postgres://``) URL gets the psycopg 3 driver, the one installed.
    """
    if url.startswith("sqlite"):
        # one connection per process: threads queue on the pool (fair, no sleeping) instead of meeting
        # in SQLite's busy handler, whose back-off sleeps up to 100 ms per collision
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
            hide_parameters=True,  # a database error's message must not carry a letter or a patient into a log
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        if engine.url.database and engine.url.database != ":memory:" and not engine.url.database.startswith("file:"):
            _one_writer_at_a_time(engine, engine.url.database + "-writer")
        return engine
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True, hide_parameters=True)


def _one_writer_at_a_time(engine: Engine, lock_path: str) -> None:
    """Processes sharing a SQLite file take turns on its one writer connection through a lock file.

    Without it, two gateway processes meet in SQLite's busy handler, which sleeps 1, 2, 5, 10, 25 …
    ms between tries while holding the process's only connection: hundreds of such sleeps a minute
    under load (measured with strace), each one stalling that process's commits.  ``flock`` queues
    the waiter in the kernel and wakes it the moment the holder checks its connection back in; the
    kernel drops the lock of a process that dies.  The lock is held from checkout to checkin of the
    writer connection (the commit included); the read-only pool (:func:`reader_for`) never takes it."""
    opened: dict[str, int] = {}  # pid → descriptor: a forked worker opens its own (a shared one would not exclude)

    def descriptor() -> int:
        key = str(os.getpid())
        if key not in opened:
            opened.clear()
            opened[key] = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return opened[key]

    def take(*_args: Any) -> None:
        fcntl.flock(descriptor(), fcntl.LOCK_EX)

    def give_back(*_args: Any) -> None:
        fcntl.flock(descriptor(), fcntl.LOCK_UN)

    event.listen(engine, "checkout", take)
    event.listen(engine, "checkin", give_back)


_readers: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_readers_lock = threading.Lock()


def reader_for(engine: Engine) -> Engine:
    """The engine to read with.  A SQLite file gets a second, read-only pool beside the single writer
    connection: in WAL mode readers never wait for the writer, so a status query or a directory check
    does not queue behind a commit's fsync.  PostgreSQL gets a pool of its own in autocommit: under READ
    COMMITTED every statement sees its own snapshot whether or not a transaction wraps it, so the
    ``BEGIN`` and ``ROLLBACK`` psycopg sends around a read are two round trips for nothing (a quarter of
    the accept path's wall time under load went to them).  In-memory SQLite reads on the same engine."""
    dialect, database = engine.dialect.name, engine.url.database
    if dialect not in ("sqlite", "postgresql") or (dialect == "sqlite" and database in (None, "", ":memory:")):
        return engine
    with _readers_lock:
        found = _readers.get(engine)
        if found is None:
            found = _readers[engine] = _postgresql_reader(engine) if dialect == "postgresql" else _sqlite_reader(engine)
        return found


def _sqlite_reader(engine: Engine) -> Engine:
    reader = create_engine(
        engine.url,
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=4,
        max_overflow=4,
        hide_parameters=True,
    )
    event.listen(reader, "connect", _sqlite_reader_pragmas)
    return reader


def _postgresql_reader(engine: Engine) -> Engine:
    """Autocommit from the connection's start (switching a pooled connection to it and back costs SQLAlchemy
    more round trips than it saves); as many kept open as the delivery threads and the API read at once (an
    overflow connection is closed on return, and opening one costs the server a process); disposed with
    ``engine``, whose connections it shares the server with."""
    reader = create_engine(
        engine.url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=5, pool_pre_ping=True, hide_parameters=True
    )
    event.listen(engine, "engine_disposed", lambda _: reader.dispose())
    return reader


def _sqlite_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=1")
    cursor.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL with synchronous=FULL: every commit is on disk (one fsync of the log, ~0.6 ms here, against
    ~3 ms for the rollback journal), and readers never block the writer."""
    cursor = dbapi_connection.cursor()
    if str(dbapi_connection.execute("PRAGMA database_list").fetchone()[2]) != "":  # a file, not :memory:
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


class ResourceStore:
    """Append-only versions of FHIR resources, by type and id."""

    def __init__(self, url: str = "sqlite:///gateway.db", *, engine: Engine | None = None) -> None:
        self.engine = engine or make_engine(url)
        migrate.upgrade(self.engine)
        self.reader = reader_for(self.engine)

    def _latest_version(self, conn: Any, resource_type: str, rid: str) -> int:
        stmt = select(func.max(_versions.c.version)).where(
            and_(_versions.c.resource_type == resource_type, _versions.c.id == rid)
        )
        return int(conn.execute(stmt).scalar() or 0)

    def put(
        self,
        resource_type: str,
        rid: str,
        body: Mapping[str, Any],
        at: datetime | None = None,
        *,
        audit: Callable[[Connection, Json], None] | None = None,
    ) -> Json:
        """Store a new version; returns it with ``meta.versionId`` and ``meta.lastUpdated`` set.

        ``audit(conn, stored)`` runs in the same transaction: the change and its AuditEvent commit together."""
        with self.engine.begin() as conn:
            stored = self.put_in(conn, resource_type, rid, body, at)
            if audit is not None:
                audit(conn, stored)
        return stored

    def put_in(
        self, conn: Connection, resource_type: str, rid: str, body: Mapping[str, Any], at: datetime | None = None
    ) -> Json:
        """:meth:`put` inside the caller's transaction: an import stores many resources, all or none."""
        when = at or datetime.now(UTC)
        version = self._latest_version(conn, resource_type, rid) + 1
        stored = dict(body)
        stored["resourceType"] = resource_type
        stored["id"] = rid
        meta = dict(stored.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = when.isoformat(timespec="milliseconds")
        stored["meta"] = meta
        change = conn.execute(_CHANGED, {"resource_type": resource_type}).scalar_one()
        conn.execute(
            _versions.insert().values(
                resource_type=resource_type,
                id=rid,
                version=version,
                last_updated=when,
                deleted=False,
                body=orjson.dumps(stored).decode(),
                change_no=change,
            )
        )
        return stored

    def create(
        self,
        resource_type: str,
        body: Mapping[str, Any],
        at: datetime | None = None,
        *,
        audit: Callable[[Connection, Json], None] | None = None,
    ) -> Json:
        return self.put(resource_type, str(body.get("id") or uuid.uuid4()), body, at, audit=audit)

    def delete(
        self,
        resource_type: str,
        rid: str,
        at: datetime | None = None,
        *,
        audit: Callable[[Connection, Json], None] | None = None,
    ) -> bool:
        when = at or datetime.now(UTC)
        with self.engine.begin() as conn:
            version = self._latest_version(conn, resource_type, rid)
            if version == 0:
                return False
            change = conn.execute(_CHANGED, {"resource_type": resource_type}).scalar_one()
            conn.execute(
                _versions.insert().values(
                    resource_type=resource_type,
                    id=rid,
                    version=version + 1,
                    last_updated=when,
                    deleted=True,
                    body="{}",
                    change_no=change,
                )
            )
            if audit is not None:
                meta = {"versionId": str(version + 1), "lastUpdated": when.isoformat(timespec="milliseconds")}
                audit(conn, {"resourceType": resource_type, "id": rid, "meta": meta})
        return True

    def changed(self, resource_type: str, after: int, upto: int) -> set[str]:
        """The ids of the resources of a type written after its ``after``-th write, up to its ``upto``-th."""
        stmt = select(_versions.c.id).where(
            and_(
                _versions.c.resource_type == resource_type,
                _versions.c.change_no > after,
                _versions.c.change_no <= upto,
            )
        )
        with self.reader.connect() as conn:
            return {str(rid) for rid in conn.execute(stmt).scalars()}

    def versions_of(self, resource_type: str, ids: Iterable[str]) -> list[tuple[str, int, datetime, bool, Json]]:
        """:meth:`all_versions` of these resources only (by id, then version)."""
        wanted, found = sorted(ids), []
        with self.reader.connect() as conn:
            for start in range(0, len(wanted), 500):  # bounded IN lists
                stmt = (
                    select(_versions)
                    .where(
                        and_(
                            _versions.c.resource_type == resource_type, _versions.c.id.in_(wanted[start : start + 500])
                        )
                    )
                    .order_by(_versions.c.id, _versions.c.version)
                )
                found += [
                    (r.id, r.version, r.last_updated, r.deleted, orjson.loads(r.body)) for r in conn.execute(stmt)
                ]
        return found

    def _rows(self, resource_type: str, rid: str | None = None) -> list[Any]:
        stmt = select(_versions).where(_versions.c.resource_type == resource_type)
        if rid is not None:
            stmt = stmt.where(_versions.c.id == rid)
        stmt = stmt.order_by(_versions.c.id, _versions.c.version)
        with self.reader.connect() as conn:
            return list(conn.execute(stmt))

    def hold(self, conn: Connection, resource_types: Iterable[str]) -> None:
        """Take the write counters of these types now, in one order for every caller: a transaction that
        writes several types (an import) would otherwise lock them in the order it meets them, and two
        such on PostgreSQL could each wait for the other's (a deadlock, one of them aborted)."""
        for resource_type in sorted(set(resource_types)):
            conn.execute(_HOLD, {"resource_type": resource_type})

    def changes(self) -> dict[str, int]:
        """How many writes (versions, deletions) each resource type has had: a type's number changes
        exactly when one of its resources does, the cheap version number of :class:`StoreSnapshot`."""
        with self.reader.connect() as conn:  # asked per letter and per batch: plain SQL, nothing to compile
            return {str(t): int(n) for t, n in conn.exec_driver_sql(_CHANGES)}

    def history(self, resource_type: str, rid: str) -> list[tuple[int, datetime, bool, Json]]:
        """(version, last updated, deleted, body) of every version, oldest first."""
        return [(r.version, r.last_updated, r.deleted, orjson.loads(r.body)) for r in self._rows(resource_type, rid)]

    def read(self, resource_type: str, rid: str) -> Json | None:
        versions = self.history(resource_type, rid)
        if not versions or versions[-1][2]:
            return None
        return versions[-1][3]

    def vread(self, resource_type: str, rid: str, version: int) -> Json | None:
        return next(
            (body for v, _, deleted, body in self.history(resource_type, rid) if v == version and not deleted), None
        )

    def current(self, resource_type: str) -> list[Json]:
        """The latest non-deleted version of every resource of a type."""
        latest: dict[str, Any] = {}
        for row in self._rows(resource_type):
            latest[row.id] = row
        return [orjson.loads(r.body) for r in latest.values() if not r.deleted]

    def all_versions(self, resource_type: str) -> list[tuple[str, int, datetime, bool, Json]]:
        return [(r.id, r.version, r.last_updated, r.deleted, orjson.loads(r.body)) for r in self._rows(resource_type)]


def consent_versions(rows: Iterable[tuple[str, int, datetime, bool, Json]]) -> dict[str, tuple[ConsentVersion, ...]]:
    """Stored Consent rows (by id, then version) as each consent's versions, by id."""
    grouped: dict[str, list[ConsentVersion]] = {}
    for rid, version, updated, deleted, body in rows:
        when = updated if updated.tzinfo else updated.replace(tzinfo=UTC)
        if deleted:
            # a deletion withdraws the consent from then on: it no longer decides anything
            body = {**(grouped[rid][-1].resource if grouped.get(rid) else {}), "status": "inactive"}
        else:
            when = _instant((body.get("meta") or {}).get("lastUpdated")) or when
        grouped.setdefault(rid, []).append(ConsentVersion(rid, str(version), when, body))
    return {rid: tuple(group) for rid, group in grouped.items()}


class SqlConsentStore:
    """The consent store of the decision stage, read from SQL with every version."""

    def __init__(self, store: ResourceStore) -> None:
        self.store = store

    def versions(self) -> Sequence[Sequence[ConsentVersion]]:
        return list(consent_versions(self.store.all_versions("Consent")).values())

    @property
    def related(self) -> list[Json]:
        return self.store.current("RelatedPerson")

    def about(self, patient_ids: Collection[PatientKey]) -> tuple[list[Sequence[ConsentVersion]], list[Json]]:
        return about_patient(self.versions(), self.related, patient_ids)


class ConsentSnapshot:
    """Consents and legal representatives as read at one instant (a :class:`ConsentStore`), by id, and
    indexed by patient: each decision reads only its patient's.  Never mutated once made."""

    __slots__ = ("by_id", "index", "related_by_id")

    def __init__(
        self,
        consents: Mapping[str, tuple[ConsentVersion, ...]],
        related: Mapping[str, Json],
        index: PatientIndex | None = None,
    ) -> None:
        self.by_id, self.related_by_id = consents, related  # each consent's versions, each RelatedPerson
        self.index = index if index is not None else PatientIndex(consents.values(), related.values())

    def versions(self) -> Sequence[Sequence[ConsentVersion]]:
        return [self.by_id[rid] for rid in sorted(self.by_id)]

    @property
    def related(self) -> list[Json]:
        return [self.related_by_id[rid] for rid in sorted(self.related_by_id)]

    def about(self, patient_ids: Collection[PatientKey]) -> tuple[list[Sequence[ConsentVersion]], list[Json]]:
        return self.index.about(patient_ids)


class StoreSnapshot:
    """The directory and the consents as stored now, re-read only when one of them was written.

    The API routes every letter and every worker batch decides consent "as stored now"; re-reading
    and re-parsing every directory entry and every consent each time cost more than the letter
    itself.  The per-type write counters (``resource_change``, one row a type) tell whether anything
    changed, in any process: an admin's ``PUT`` through another gateway is seen on the next call.  A
    directory change re-reads the directory; a consent change, the consents written since.  Thread-safe;
    what it returns is shared and must not be mutated.
    """

    def __init__(self, store: ResourceStore, policy: Policy) -> None:
        self.store, self.policy = store, policy
        self._lock = threading.Lock()
        self._directory: tuple[tuple[int, ...], Directory] | None = None
        self._consents: _Consents | None = None

    def current(self) -> tuple[Directory, ConsentSnapshot]:
        changes = self.store.changes()
        directory_key = tuple(changes.get(t, 0) for t in DIRECTORY_TYPES)
        consent_key = (changes.get("Consent", 0), changes.get("RelatedPerson", 0))
        with self._lock:
            if self._directory is None or self._directory[0] != directory_key:
                self._directory = (directory_key, directory_from_store(self.store, self.policy))
            if self._consents is None or self._consents.key != consent_key:
                self._consents = _Consents.read(self.store, consent_key, self._consents)
            return self._directory[1], self._consents.snapshot

    def directory(self) -> Directory:
        return self.current()[0]


@dataclass(frozen=True, slots=True)
class _Consents:
    """The consents and legal representatives as of the write counters ``key`` (Consent, RelatedPerson).

    Read whole once; after that, only the resources written since are read again, and the patient index
    is updated rather than rebuilt — a hospital's store holds every patient's consents, and re-reading
    20,000 of them took 1.2 s of CPU at each change, with every letter of the process waiting
    (``tests/unit/test_store_changes.py`` checks the result against a whole re-read)."""

    key: tuple[int, int]
    snapshot: ConsentSnapshot

    @classmethod
    def read(cls, store: ResourceStore, key: tuple[int, int], before: _Consents | None) -> _Consents:
        if before is None or before.key[0] > key[0] or before.key[1] > key[1]:  # first, or another database
            consents = consent_versions(store.all_versions("Consent"))
            related = {str(r["id"]): r for r in store.current("RelatedPerson")}
            return cls(key, ConsentSnapshot(consents, related))
        new_consents: dict[str, tuple[ConsentVersion, ...] | None] = {}
        new_related: dict[str, Json | None] = {}
        if key[0] != before.key[0]:
            ids = store.changed("Consent", before.key[0], key[0])
            new_consents = dict.fromkeys(ids) | consent_versions(store.versions_of("Consent", ids))
        if key[1] != before.key[1]:
            new_related = dict.fromkeys(store.changed("RelatedPerson", before.key[1], key[1]))
            for rid, _, _, deleted, body in store.versions_of("RelatedPerson", new_related):
                new_related[rid] = None if deleted else body  # by version: the last one stands
        old = before.snapshot
        consents, related = _replaced(old.by_id, new_consents), _replaced(old.related_by_id, new_related)
        index = old.index.changed(new_consents, new_related, (old.by_id, old.related_by_id))
        return cls(key, ConsentSnapshot(consents, related, index))


def _replaced(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s entries (by id) in place of its own; ``None`` removes one."""
    made = dict(old)
    for rid, value in new.items():
        if value is None:
            made.pop(rid, None)
        else:
            made[rid] = value
    return made


def directory_from_store(store: ResourceStore, policy: Policy, base: str = "") -> Directory:
    """The directory as currently stored (each resource's fullUrl is ``<base>/<Type>/<id>``)."""
    entries: list[Json] = []
    for resource_type in DIRECTORY_TYPES:
        for body in store.current(resource_type):
            entries.append({"fullUrl": f"{base}/{resource_type}/{body['id']}" if base else None, "resource": body})
    return Directory({"resourceType": "Bundle", "type": "collection", "entry": _clean(entries)}, policy, "store")


def _clean(entries: Iterable[Json]) -> list[Json]:
    return [{k: v for k, v in e.items() if v is not None} for e in entries]
