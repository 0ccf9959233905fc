"""Several gateway processes share one PostgreSQL outbox: every delivery is sent exactly once.

Each worker is a real OS process looping ``Outbox.claim`` + ``finish`` with a counting transport
that records every message it hands over in a table, so a message claimed twice (or never) shows.
A crashed worker's claim is taken back by another worker once its lease has expired.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from gateway.outbox import Outbox
from gateway.store import make_engine
from tests.conftest import ROOT

LETTERS, RECIPIENTS, WORKERS = 30, 3, 3

# one worker process: claim two at a time, "send" (record the hand-over, take a little time), finish
WORKER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from sqlalchemy import text
from gateway.outbox import Outbox
from gateway.store import make_engine

url, name, ready, go = sys.argv[1:5]
engine = make_engine(url)
outbox = Outbox(engine)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
while claimed := outbox.claim(name, datetime.now(UTC), limit=2):
    for d in claimed:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO sent_log (message_id, worker) VALUES (:m, :w)"), {"m": d.message_id, "w": name})
        time.sleep(0.005)
        if not outbox.finish(d.message_id, name, "acknowledged", datetime.now(UTC)):
            sys.exit(f"{name} lost its claim on {d.message_id}")
engine.dispose()
"""

# a worker that claims, reports what it holds, and hangs until it is killed
CRASHING = """
import sys, time
from datetime import UTC, datetime
from gateway.outbox import Outbox
from gateway.store import make_engine

outbox = Outbox(make_engine(sys.argv[1]))
print(" ".join(d.message_id for d in outbox.claim("crashed", datetime.fromisoformat(sys.argv[2]), limit=5)), flush=True)
time.sleep(120)
"""


def accept_letters(
    outbox: Outbox, letters: int, recipients: int, now: datetime, hold: timedelta = timedelta(0), first: int = 0
) -> set[str]:
    """``letters`` letters of ``recipients`` deliveries each, straight into the outbox; their message ids."""
    ids: set[str] = set()
    for n in range(first, first + letters):
        deliveries = [
            (str(uuid.uuid4()), f"recipient-{r}", f"Practitioner/p{r}", "https://127.0.0.1:9/fhir")
            for r in range(recipients)
        ]
        ids |= {d[0] for d in deliveries}
        outbox.accept(
            document_key=f"urn:oid:1.2.250.1.999|letter-{n}",
            set_key=None,
            version=None,
            client="test",
            media_type="application/hl7-cda+xml",
            body=b"<ClinicalDocument/>",
            deliveries=deliveries,
            audit_events=[],
            now=now,
            hold=hold,
        )
    return ids


def test_three_processes_share_the_outbox_and_send_each_message_exactly_once(
    postgresql_url: str, tmp_path: Path
) -> None:
    engine = make_engine(postgresql_url)
    outbox = Outbox(engine)
    with engine.begin() as conn:  # no unique key: a message handed over twice must show as two rows
        conn.execute(text("CREATE TABLE sent_log (seq SERIAL PRIMARY KEY, message_id TEXT, worker TEXT)"))
    expected = accept_letters(outbox, LETTERS, RECIPIENTS, datetime.now(UTC) - timedelta(seconds=1))
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgresql_url, f"worker-{i}", str(tmp_path / f"ready-{i}"), str(go)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(WORKERS)):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "a worker did not start"
            time.sleep(0.01)
        go.touch()  # all start claiming together
        codes = [w.wait(60) for w in workers]
        errors = [w.stderr.read() if w.stderr else "" for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
            if w.stderr:
                w.stderr.close()
    assert codes == [0] * WORKERS, errors
    with engine.connect() as conn:
        sent = conn.execute(text("SELECT message_id, worker FROM sent_log")).all()
    deliveries = outbox.deliveries()
    engine.dispose()
    assert Counter(m for m, _ in sent) == Counter(expected), "each delivery handed over exactly once, none lost"
    assert len(sent) == LETTERS * RECIPIENTS
    assert {w for _, w in sent} == {f"worker-{i}" for i in range(WORKERS)}, "the work was shared"
    assert {d.message_id for d in deliveries} == expected
    assert {(d.status, d.attempts) for d in deliveries} == {("acknowledged", 1)}


def test_a_crashed_workers_expired_lease_is_taken_back_by_another(outbox: Outbox, database_url: str) -> None:
    start = datetime.now(UTC)
    expected = accept_letters(outbox, 1, 5, start - timedelta(seconds=1))
    crashing = subprocess.Popen(
        [sys.executable, "-c", CRASHING, database_url, start.isoformat()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = set((crashing.stdout.readline() if crashing.stdout else "").split())
    finally:
        crashing.kill()  # the worker dies holding its claims
        crashing.wait()
        if crashing.stdout:
            crashing.stdout.close()
    assert held == expected
    lease = timedelta(minutes=2)
    assert outbox.claim("survivor", start + timedelta(minutes=1), lease=lease) == [], "the lease still holds"
    later = start + lease + timedelta(seconds=1)
    taken = outbox.claim("survivor", later, lease=lease)
    assert {d.message_id for d in taken} == expected
    assert all(outbox.finish(d.message_id, "survivor", "acknowledged", later) for d in taken)
    assert not outbox.finish(next(iter(expected)), "crashed", "acknowledged", later), "a dead worker's claim is void"
    assert {(d.status, d.attempts) for d in outbox.deliveries()} == {("acknowledged", 1)}
    assert outbox.claim("survivor", later + lease * 2, lease=lease) == [], "nothing left: no second send"
