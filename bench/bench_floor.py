"""The floor of the stack: letters/s that FastAPI + uvicorn + SQLite + httpx allow on this machine, with none
of the letter's own work (no parsing, translation, routing, consent, redaction, signature nor audit).

    python bench/bench_floor.py [--letters 600] [--processes 2] [--threads 4] [--rounds 2]
                                [--message-bytes 0] [--with-gateway]

Issue 4 asks for >= 200 letters/s accepted and acknowledged end to end, 3 recipients per letter, on this
2-core machine; ``bench/bench_load.py`` measures the gateway doing it.  This measures the same architecture
doing nothing else, so that what the gateway costs can be told from what its stack costs:

- **front** (stands for ``gateway serve``): FastAPI served by uvicorn as ``_serve_process`` serves it
  (httptools + uvloop, access log off, ``settle_heap``), ``--processes`` workers forked and sharing one
  port through :mod:`gateway.supervise` (``SO_REUSEPORT``).  ``POST /letters`` reads the body and, in
  ``run_in_threadpool``, INSERTs the letter row and its 3 delivery rows (the outbox's tables and indexes)
  in one transaction on SQLite as ``make_engine`` opens it (WAL, ``synchronous=FULL``, one writer
  connection per process whose turn is taken across processes through a ``flock``ed lock file); 202.
  The endpoint is served by Starlette's ``request_response`` as the gateway's ``/letters`` is (no
  FastAPI dependency machinery);
- in each front process, ``--threads`` delivery threads, woken by the API as the gateway's are: claim the
  deliveries of up to 4 fresh letters (``UPDATE ... RETURNING``; else what is due, after a read-only look),
  POST each message with one ``httpx.Client`` per thread (keep-alive), check the response message's
  ``ok`` and identifier, record the batch acknowledged in one UPDATE and one commit;
- **receiver** (stands for ``gateway receiver``): one uvicorn process; ``POST /fhir/{ep}/$process-message``
  parses the JSON with orjson, INSERTs it (message id primary key: a resend gets the first answer) and
  commits on the event loop as the real one does, answers a small FHIR response message;
- the load client and the measurement are ``bench_load.py``'s own (imported): 16 keep-alive connections
  pushing the same letters, time from first push to last acknowledgement, CPU from ``/proc``.

The messages are JSON of the sizes the real ones have (those ``bench_load.py``'s receiver stores for the S6
letter: 116,388, 26,505 and 24,069 characters), or ``--message-bytes`` each.  ``--with-gateway`` runs
``bench_load.py``'s throughput measurement on the real gateway too, interleaved (floor, gateway, floor,
gateway...: the machine is shared and noisy), and compares the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import httpx
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FHIR_JSON = "application/fhir+json"
# the S6 letter's three messages, as bench_load.py's receiver stores them (characters; measured 2026)
RECIPIENTS = (("gp", 116_388), ("clic", 26_505), ("saad", 24_069))
PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
FRESH_PER_BATCH = 4  # gateway.deliver._FRESH_PER_BATCH: letters accepted here, claimed together
CLAIM_LIMIT = 10  # Deliverer.run_once's limit for a claim of what is due
HOLD = timedelta(seconds=5)  # gateway.deliver._HOLD: what a process accepted is its own to claim first
LEASE = timedelta(seconds=120)
IDLE = 0.5  # seconds a delivery thread sleeps when nothing is due, unless woken (Deliverer.run_forever)


# -- bench_load.py's pieces, typed (imported by path: it is a script, not a package) ----------------------


def _bench_load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", HERE / "bench_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class _Load:
    """What is used of ``bench_load.py``: its load client, its CPU meter and its real-gateway rig."""

    module: ModuleType
    push: Callable[[list[str], int, float, str], Coroutine[Any, Any, tuple[set[str], float]]]
    cpu_seconds: Callable[[int], float]
    port: Callable[[], int]
    wait: Callable[[str], None]

    @classmethod
    def load(cls) -> _Load:
        module = _bench_load()
        return cls(module, module._push, module._cpu_seconds, module._port, module._wait)


# -- SQLite as gateway.store.make_engine opens it -------------------------------------------------------------


def _connect(db: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """WAL, ``synchronous=FULL`` (``_sqlite_pragmas``), 30 s busy timeout; transactions begun explicitly."""
    conn = sqlite3.connect(str(db), timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if read_only:
        conn.execute("PRAGMA query_only=1")  # gateway.store.reader_for
    return conn


def _stamp(when: datetime) -> str:
    """A time as SQLAlchemy's SQLite ``DateTime`` stores it."""
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")


# the outbox's two tables and their indexes (gateway/outbox.py, after every migration)
SCHEMA = """
CREATE TABLE IF NOT EXISTS letter (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    document_key VARCHAR(512) NOT NULL UNIQUE,
    set_key VARCHAR(512),
    version INTEGER,
    received_at DATETIME NOT NULL,
    client VARCHAR(128) NOT NULL,
    media_type VARCHAR(64) NOT NULL,
    body BLOB NOT NULL,
    replaces VARCHAR(64)
);
CREATE INDEX IF NOT EXISTS ix_letter_set_key_version ON letter (set_key, version);
CREATE INDEX IF NOT EXISTS ix_letter_kept ON letter (received_at) WHERE length(body) > 0;
CREATE TABLE IF NOT EXISTS delivery (
    message_id VARCHAR(64) NOT NULL PRIMARY KEY,
    letter_id VARCHAR(64) NOT NULL REFERENCES letter (id),
    recipient_id VARCHAR(256) NOT NULL,
    recipient_ref VARCHAR(512) NOT NULL,
    endpoint VARCHAR(1024) NOT NULL,
    status VARCHAR(32) NOT NULL,
    attempts INTEGER NOT NULL,
    due_at DATETIME NOT NULL,
    claimed_by VARCHAR(64),
    claimed_at DATETIME,
    updated_at DATETIME NOT NULL,
    last_error TEXT,
    replaces VARCHAR(64),
    queued_at DATETIME,
    sent_at DATETIME,
    acknowledged_at DATETIME,
    kind VARCHAR(16) DEFAULT 'letter' NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_delivery_letter_status ON delivery (letter_id, status);
CREATE INDEX IF NOT EXISTS ix_delivery_status_due ON delivery (status, due_at);
CREATE INDEX IF NOT EXISTS ix_delivery_status_updated ON delivery (status, updated_at, message_id);
"""
INSERT_LETTER = (
    "INSERT INTO letter (id, document_key, set_key, version, received_at, client, media_type, body, replaces) "
    "VALUES (?, ?, NULL, NULL, ?, ?, ?, ?, NULL)"
)
INSERT_DELIVERY = (
    "INSERT INTO delivery (message_id, letter_id, recipient_id, recipient_ref, endpoint, status, attempts, due_at, "
    "claimed_by, claimed_at, updated_at, last_error, replaces, queued_at, sent_at, acknowledged_at, kind) "
    "VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?, NULL, ?, NULL, NULL, ?, NULL, NULL, 'letter')"
)
_CLAIMED = "RETURNING message_id, letter_id, recipient_id, endpoint"


def _claim_letters_sql(letters: int) -> str:
    """The claim of the queued deliveries of ``letters`` letters (the outbox's ``_claim_statement``)."""
    among = ", ".join("?" * letters)
    due = f"status = 'queued' AND letter_id IN ({among})"
    return (
        f"WITH picked AS (SELECT message_id FROM delivery WHERE {due} LIMIT ?) "
        "UPDATE delivery SET status = 'sending', claimed_by = ?, claimed_at = ?, updated_at = ? "
        f"WHERE message_id IN (SELECT message_id FROM picked) AND {due} {_CLAIMED}"
    )


_DUE = "((status IN ('queued', 'failed-retrying') AND due_at <= ?) OR (status = 'sending' AND claimed_at < ?))"
ANY_DUE = f"SELECT message_id FROM delivery WHERE {_DUE} ORDER BY due_at, letter_id LIMIT 1"
CLAIM_DUE = (
    f"WITH picked AS (SELECT message_id FROM delivery WHERE {_DUE} ORDER BY due_at, letter_id LIMIT ?) "
    "UPDATE delivery SET status = 'sending', claimed_by = ?, claimed_at = ?, updated_at = ? "
    f"WHERE message_id IN (SELECT message_id FROM picked) AND {_DUE} {_CLAIMED}"
)


def _finish_sql(count: int, status: str) -> str:
    """The batch's outcome recorded in one UPDATE, only where this worker still holds the claim."""
    stamps = ", sent_at = :t, acknowledged_at = :t" if status == "acknowledged" else ""
    among = ", ".join(f":m{i}" for i in range(count))
    return (
        f"UPDATE delivery SET status = '{status}', attempts = attempts + 1, updated_at = :t, last_error = :e, "
        f"due_at = :d, claimed_by = NULL, claimed_at = NULL{stamps} "
        f"WHERE message_id IN ({among}) AND claimed_by = :w AND status = 'sending' RETURNING message_id"
    )


class _Writer:
    """The process's one writer connection (``make_engine``'s ``pool_size=1``: threads queue for it), its
    turn across processes taken through a ``flock``ed lock file (``_one_writer_at_a_time``)."""

    def __init__(self, db: Path) -> None:
        self.conn = _connect(db)
        self.lock = threading.Lock()
        self.fd = os.open(f"{db}-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        with self.lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                cursor = self.conn.cursor()
                cursor.execute("BEGIN")
                try:
                    yield cursor
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                finally:
                    cursor.close()
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


# -- the messages ------------------------------------------------------------------------------------------


def _template(recipient: str, size: int) -> bytes:
    """A FHIR message Bundle of about ``size`` bytes: a MessageHeader (id ``PLACEHOLDER``), then resources of
    the nested shape a cut letter's are (codings, references, narrative), as many as it takes."""
    header = {
        "fullUrl": f"urn:uuid:{PLACEHOLDER}",
        "resource": {
            "resourceType": "MessageHeader",
            "id": PLACEHOLDER,
            "eventCoding": {"system": "https://fhir.discharge-gateway.fr/CodeSystem/message-event", "code": "dn"},
            "destination": [{"endpoint": f"http://127.0.0.1/fhir/ep-{recipient}", "name": recipient}],
            "source": {"name": "floor", "endpoint": "https://floor.localhost/fhir"},
            "focus": [{"reference": "urn:uuid:9868d874-8048-5fa1-aedb-2a75151d8abc"}],
        },
    }
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": PLACEHOLDER, "type": "message", "entry": [header]}
    n = 0
    while len(orjson.dumps(bundle)) < size:
        n += 1
        bundle["entry"].append(
            {
                "fullUrl": f"urn:uuid:{uuid.UUID(int=n)}",
                "resource": {
                    "resourceType": "Observation",
                    "id": str(uuid.UUID(int=n)),
                    "status": "final",
                    "code": {
                        "coding": [{"system": "http://loinc.org", "code": f"{8000 + n}-{n % 10}", "display": "Vital"}]
                    },
                    "subject": {"reference": "urn:uuid:76208c08-4cf6-5617-8bbe-0d2b336e0857"},
                    "effectiveDateTime": "2026-10-28T15:00:00+01:00",
                    "valueQuantity": {"value": n / 10, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org"},
                    "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{n}</div>'},
                },
            }
        )
    return orjson.dumps(bundle)


def _answered(content: bytes) -> str | None:
    """The message id a response message acknowledges with ``ok`` (None otherwise), as HttpTransport reads it."""
    try:
        header = orjson.loads(content)["entry"][0]["resource"]
        return str(header["response"]["identifier"]) if header["response"]["code"] == "ok" else None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None


# -- front: stands for `gateway serve` ---------------------------------------------------------------------


class _Front:
    """One front process: the API's accept and the delivery threads, on the shared outbox file."""

    def __init__(self, db: Path, receiver: str, message_bytes: int) -> None:
        self.db, self.writer = db, _Writer(db)
        self.holder = f"worker-{uuid.uuid4()}"
        self.fresh: deque[str] = deque()  # accepted here, not claimed yet (Deliverer._fresh)
        self.work, self.stopping = threading.Event(), threading.Event()
        self.recipients = [
            (name, f"PractitionerRole/{name}", f"{receiver}/fhir/ep-{name}", _template(name, message_bytes or size))
            for name, size in RECIPIENTS
        ]
        self.templates = {name: body for name, _, _, body in self.recipients}
        self.threads: list[threading.Thread] = []

    def accept(self, body: bytes, media_type: str, client: str, now: datetime) -> str:
        """The letter and its deliveries in one transaction, then the delivery threads woken."""
        letter_id, stamp, due = str(uuid.uuid4()), _stamp(now), _stamp(now + HOLD)
        rows = [
            (str(uuid.uuid4()), letter_id, name, ref, endpoint, due, self.holder, stamp, stamp)
            for name, ref, endpoint, _ in self.recipients
        ]
        with self.writer.transaction() as cursor:
            cursor.execute(INSERT_LETTER, (letter_id, letter_id, stamp, client, media_type, body))
            cursor.executemany(INSERT_DELIVERY, rows)
        self.fresh.append(letter_id)
        self.work.set()
        return letter_id

    def start(self, threads: int) -> None:
        for i in range(threads):
            thread = threading.Thread(
                target=self._loop, args=(f"{self.holder}-{i}",), name=f"delivery-{i}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.work.set()
        for thread in self.threads:
            thread.join(5)

    def _loop(self, worker: str) -> None:
        reader = _connect(self.db, read_only=True)
        with httpx.Client(timeout=10.0) as client:
            while not self.stopping.is_set():
                try:
                    attempted = self._batch(worker, reader, client)
                except Exception as error:  # the database busy past its timeout...: the lease covers it
                    print(f"delivery batch failed: {type(error).__name__}: {error}", file=sys.stderr)
                    attempted = 0
                if attempted == 0:
                    self.work.wait(IDLE)
                    self.work.clear()
        reader.close()

    def _claim(self, worker: str, reader: sqlite3.Connection, now: datetime) -> list[tuple[str, str, str, str]]:
        stamp, fresh = _stamp(now), []
        with contextlib.suppress(IndexError):
            for _ in range(FRESH_PER_BATCH):
                fresh.append(self.fresh.popleft())
        if fresh:
            with self.writer.transaction() as cursor:
                cursor.execute(_claim_letters_sql(len(fresh)), (*fresh, 16 * CLAIM_LIMIT, worker, stamp, stamp, *fresh))
                claimed: list[tuple[str, str, str, str]] = cursor.fetchall()
            if claimed:
                return claimed
        due = (stamp, _stamp(now - LEASE))
        if reader.execute(ANY_DUE, due).fetchone() is None:  # an idle look reads, and writes nothing
            return []
        with self.writer.transaction() as cursor:
            cursor.execute(CLAIM_DUE, (*due, CLAIM_LIMIT, worker, stamp, stamp, *due))
            claimed = cursor.fetchall()
        letters = list(dict.fromkeys(letter_id for _, letter_id, _, _ in claimed))
        if len(claimed) == CLAIM_LIMIT and letters:  # the limit may have cut a letter: take the rest of it
            with self.writer.transaction() as cursor:
                sql = _claim_letters_sql(len(letters))
                cursor.execute(sql, (*letters, 16 * CLAIM_LIMIT, worker, stamp, stamp, *letters))
                claimed += cursor.fetchall()
        return claimed

    def _batch(self, worker: str, reader: sqlite3.Connection, client: httpx.Client) -> int:
        claimed = self._claim(worker, reader, datetime.now(UTC))
        if not claimed:
            return 0
        acknowledged: list[str] = []
        failed: list[str] = []
        for message_id, _, recipient, endpoint in claimed:
            body = self.templates[recipient].replace(PLACEHOLDER.encode(), message_id.encode())
            try:
                response = client.post(
                    f"{endpoint}/$process-message",
                    content=body,
                    headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
                )
                ok = response.status_code == 200 and _answered(response.content) == message_id
            except httpx.TransportError:
                ok = False
            (acknowledged if ok else failed).append(message_id)
        now = datetime.now(UTC)
        with self.writer.transaction() as cursor:
            for status, ids, error, due in (
                ("acknowledged", acknowledged, None, now),
                ("failed-retrying", failed, "not acknowledged", now + timedelta(seconds=1)),
            ):
                if ids:
                    params: dict[str, Any] = {"t": _stamp(now), "e": error, "d": _stamp(due), "w": worker}
                    params.update((f"m{i}", message_id) for i, message_id in enumerate(ids))
                    cursor.execute(_finish_sql(len(ids), status), params).fetchall()
        return len(claimed)

    def app(self) -> Any:
        from fastapi import FastAPI, Request, Response
        from fastapi.routing import APIRoute
        from starlette.concurrency import run_in_threadpool
        from starlette.routing import request_response

        app = FastAPI(title="floor front")

        @app.post("/letters", status_code=202)
        async def push_letter(request: Request) -> Response:
            now = datetime.now(UTC)
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            raw = await request.body()
            letter_id = await run_in_threadpool(self.accept, raw, media_type, "his", now)
            return Response(orjson.dumps({"letterId": letter_id}), status_code=202, media_type=FHIR_JSON)

        @app.get("/healthz")
        async def healthz() -> Response:
            return Response(b"{}", media_type="application/json")

        for route in app.routes:  # as gateway.api.app serves /letters: without FastAPI's dependency machinery
            if isinstance(route, APIRoute) and route.endpoint is push_letter:
                route.app = request_response(route.endpoint)
        return app


def _front(args: argparse.Namespace) -> int:
    """``gateway serve [--processes N]``'s shape: the schema made once, then N forked, supervised workers
    each listening on the port (or, for 1, uvicorn binding it in this process)."""
    import uvicorn

    from gateway.supervise import Listener, settle_heap, supervise

    db = Path(args.db)
    with contextlib.closing(_connect(db)) as conn:
        conn.executescript(SCHEMA)
    port = Listener(args.host, args.port) if args.processes > 1 else None

    def run(_index: int) -> int:
        front = _Front(db, args.receiver, args.message_bytes)
        front.start(args.threads)
        config = uvicorn.Config(
            front.app(),
            host=args.host,
            port=args.port,
            log_level="warning",  # gateway serve --quiet
            log_config=None,
            access_log=False,
        )
        settle_heap()
        try:
            uvicorn.Server(config).run(sockets=[port.for_worker()] if port is not None else None)
        finally:
            front.stop()
        return 0

    if port is None:
        return run(0)
    return supervise(args.processes, run)


# -- receiver: stands for `gateway receiver` ---------------------------------------------------------------


def _receiver(args: argparse.Namespace) -> int:
    import uvicorn
    from fastapi import FastAPI, Request, Response
    from fastapi.routing import APIRoute
    from starlette.routing import request_response

    from gateway.receiver import _response_message as response_message  # the reference receiver's answer
    from gateway.supervise import settle_heap

    conn = _connect(Path(args.db))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS received_message (message_id VARCHAR(64) NOT NULL PRIMARY KEY, "
        "bundle_id VARCHAR(64) NOT NULL, received_at DATETIME NOT NULL, response TEXT NOT NULL, body TEXT NOT NULL)"
    )
    app = FastAPI(title="floor receiver")

    @app.post("/fhir/{mailbox}/$process-message")
    async def process_message(request: Request) -> Response:
        body = await request.body()
        bundle = orjson.loads(body)
        header = bundle["entry"][0]["resource"]
        message_id = str(header["id"])
        now = datetime.now(UTC)
        response = orjson.dumps(response_message(header, "http://127.0.0.1/fhir", now))  # the receiver's own
        try:  # on the event loop, as gateway.receiver stores; one statement, one commit (autocommit)
            conn.execute(
                "INSERT INTO received_message (message_id, bundle_id, received_at, response, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (message_id, str(bundle.get("id", "")), _stamp(now), response.decode(), body.decode()),
            )
        except sqlite3.IntegrityError:  # a resend: the first answer
            [[first]] = conn.execute(
                "SELECT response FROM received_message WHERE message_id = ?", (message_id,)
            ).fetchall()
            response = str(first).encode()
        return Response(response, media_type=FHIR_JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"{}", media_type="application/json")

    for route in app.routes:
        if isinstance(route, APIRoute) and route.endpoint is process_message:
            route.app = request_response(route.endpoint)
    settle_heap()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", log_config=None)  # as `gateway receiver`
    return 0


# -- the rigs and the measurement --------------------------------------------------------------------------


class _FloorRig:
    """Receiver + front processes (this script in its two roles) on fresh SQLite files."""

    def __init__(self, load: _Load, tmp: Path, processes: int, threads: int, message_bytes: int) -> None:
        self.load, self.tmp = load, tmp
        rx_port, port = load.port(), load.port()
        me = [sys.executable, str(Path(__file__).resolve())]
        self.logs: list[IO[bytes]] = [open(tmp / "rx.log", "wb"), open(tmp / "front.log", "wb")]  # noqa: SIM115
        self.receiver = subprocess.Popen(
            [*me, "--role", "receiver", "--port", str(rx_port), "--db", str(tmp / "rx.db")],
            stdout=subprocess.DEVNULL,
            stderr=self.logs[0],
        )
        self.front = subprocess.Popen(
            [
                *me,
                "--role",
                "front",
                "--port",
                str(port),
                "--db",
                str(tmp / "gw.db"),
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                "--receiver",
                f"http://127.0.0.1:{rx_port}",
                "--message-bytes",
                str(message_bytes),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.logs[1],
        )
        self.urls = [f"http://127.0.0.1:{port}"]
        try:
            load.wait(f"http://127.0.0.1:{rx_port}/healthz")
            load.wait(f"{self.urls[0]}/healthz")
        except BaseException:
            self._stop()
            raise
        self.reader = _connect(tmp / "gw.db", read_only=True)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the front processes (supervisor + workers) and by the receiver."""
        return self.load.cpu_seconds(self.front.pid), self.load.cpu_seconds(self.receiver.pid)

    def pending(self, letters: set[str]) -> int:
        """As ``bench_load.Rig.pending`` reads it: every delivery's letter and status."""
        rows = self.reader.execute("SELECT letter_id, status FROM delivery").fetchall()
        return sum(1 for letter_id, status in rows if letter_id in letters and status != "acknowledged")

    def close(self) -> None:
        retried = self.reader.execute("SELECT count(*) FROM delivery WHERE attempts > 1").fetchone()[0]
        if retried:  # none expected: a retry waits a second and would weigh on the figures
            print(f"[floor] {retried} deliveries needed more than one attempt", file=sys.stderr)
        self.reader.close()
        self._stop()
        errors = (self.tmp / "front.log").read_text(errors="replace")
        if "delivery batch failed" in errors or "Traceback" in errors:
            print(f"[floor] front's stderr:\n{errors[-2000:]}", file=sys.stderr)

    def _stop(self) -> None:
        for proc in (self.front, self.receiver):
            proc.send_signal(signal.SIGTERM)
        for proc in (self.front, self.receiver):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


@dataclass(frozen=True)
class Result:
    letters: int
    accepted: float  # seconds from the first push to the last 202
    finished: float  # seconds from the first push to the last acknowledgement
    server_cpu: float  # ms per letter: front (or gateway) processes
    receiver_cpu: float  # ms per letter
    client_cpu: float  # ms per letter: this process (load client and the drain's polling)

    @property
    def rate(self) -> float:
        return self.letters / self.finished


def _medians(results: list[Result]) -> tuple[float, float, float, float]:
    """Median letters/s end to end, then CPU per letter of the server, the receiver and the load client."""
    return (
        statistics.median(r.rate for r in results),
        statistics.median(r.server_cpu for r in results),
        statistics.median(r.receiver_cpu for r in results),
        statistics.median(r.client_cpu for r in results),
    )


def _throughput(
    load: _Load,
    urls: list[str],
    cpu: Callable[[], tuple[float, float]],
    pending: Callable[[set[str]], int],
    letters: int,
) -> Result:
    """``bench_load.py``'s throughput run: 20 letters to warm up, then ``letters`` as fast as the API takes
    them; first push → last acknowledgement, and the CPU used meanwhile."""

    def drain(ids: set[str], seconds: float = 600) -> float:  # bench_load._drain, for either rig
        deadline = time.monotonic() + seconds
        while pending(ids):
            if time.monotonic() > deadline:
                raise SystemExit("deliveries did not complete")
            time.sleep(0.05)
        return time.perf_counter()

    asyncio.run(load.push(urls, 20, 0, "warm"))
    drain(set())
    time.sleep(1)
    cpu_before, own_before = cpu(), time.process_time()
    ids, started = asyncio.run(load.push(urls, letters, 0, "burst"))
    accepted = time.perf_counter()
    finished = drain(ids)
    (server_after, rx_after), own_after = cpu(), time.process_time()
    per = 1000 / letters
    return Result(
        letters,
        accepted - started,
        finished - started,
        (server_after - cpu_before[0]) * per,
        (rx_after - cpu_before[1]) * per,
        (own_after - own_before) * per,
    )


def _report(label: str, server: str, result: Result) -> None:
    n = result.letters
    print(
        f"[{label}] {n} letters accepted in {result.accepted:.2f} s ({n / result.accepted:.0f}/s), all acknowledged "
        f"after {result.finished:.2f} s → {result.rate:.0f} letters/s end to end ({3 * result.rate:.0f} messages/s)"
    )
    print(
        f"[{label}] CPU per letter: {server} {result.server_cpu:.1f} ms, receiver {result.receiver_cpu:.1f} ms, "
        f"load client {result.client_cpu:.1f} ms (2 cores = {2000 * result.finished / n:.1f} ms of CPU per letter "
        "at this rate)",
        flush=True,
    )


def _floor(load: _Load, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        rig = _FloorRig(load, Path(tmp), args.processes, args.threads, args.message_bytes)
        try:
            return _throughput(load, rig.urls, rig.cpu, rig.pending, args.letters)
        finally:
            rig.close()


def _gateway(load: _Load, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        rig = load.module.Rig("sqlite", 1, Path(tmp), args.processes, 0)
        try:
            return _throughput(load, list(rig.urls), rig.cpu, rig.pending, args.letters)
        finally:
            rig.close()


def _measure(args: argparse.Namespace) -> int:
    load = _Load.load()
    sizes = (
        f"{args.message_bytes} bytes each"
        if args.message_bytes
        else ", ".join(f"{size:,}" for _, size in RECIPIENTS) + " bytes"
    )
    shape = f"{args.processes} process(es) × {args.threads} delivery threads, 3 recipients/letter, messages {sizes}"
    floors: list[Result] = []
    gateways: list[Result] = []
    for round_ in range(1, args.rounds + 1):
        floors.append(_floor(load, args))
        _report(f"floor {round_}/{args.rounds}, {shape}", "front", floors[-1])
        if args.with_gateway:
            gateways.append(_gateway(load, args))
            _report(f"gateway {round_}/{args.rounds}, sqlite, {args.processes} process(es)", "gateway", gateways[-1])
    floor_rate, floor_cpu, floor_rx, floor_client = _medians(floors)
    print(
        f"[floor] median of {len(floors)}: {floor_rate:.0f} letters/s end to end; CPU per letter: front "
        f"{floor_cpu:.1f} ms, receiver {floor_rx:.1f} ms, load client {floor_client:.1f} ms"
    )
    if gateways:
        rate, cpu, rx, _ = _medians(gateways)
        print(
            f"[compare] medians of {len(gateways)} interleaved rounds: gateway {rate:.0f} letters/s vs floor "
            f"{floor_rate:.0f} letters/s (gateway ÷ floor = {rate / floor_rate:.2f}); CPU per letter: gateway "
            f"{cpu:.1f} ms vs front {floor_cpu:.1f} ms (× {cpu / floor_cpu:.1f}), receiver {rx:.1f} ms vs "
            f"{floor_rx:.1f} ms (× {rx / floor_rx:.1f})"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", type=int, default=600)
    parser.add_argument("--processes", type=int, default=2, help="front worker processes (gateway serve --processes)")
    parser.add_argument(
        "--threads", type=int, default=4, help="delivery threads per process (GATEWAY_DELIVERY_THREADS)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each (interleaved with --with-gateway)")
    parser.add_argument(
        "--message-bytes", type=int, default=0, help="size of every message (0: the real messages' sizes)"
    )
    parser.add_argument("--with-gateway", action="store_true", help="measure the real gateway too (bench_load.py)")
    parser.add_argument("--role", choices=("front", "receiver"), help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "front":
        return _front(args)
    if args.role == "receiver":
        return _receiver(args)
    return _measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
