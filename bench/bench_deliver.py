"""CPU per letter of the gateway's own delivery path: outbox, claim, audit, packaging, HTTP send.

    python bench/bench_deliver.py [--letters 150] [--db sqlite|postgresql] [--http] [--compare DIR [--pairs 3 --rounds 30 --letters 10]]

Everything per letter *except* translation, the consent decision and redaction (``pipeline.cut_for``'s
own work) and the signature (``seal.sign``): those are computed once and reused, so what is measured is
what ``gateway/outbox.py``, ``auditlog.py``, ``audit.py``, ``package.py``, ``deliver.py`` and
``transports/http.py`` cost.  The letter is S6 (3 recipients, the social ones with the patient's consent).

Two measures, CPU time of the benchmark's thread (``time.thread_time``), per letter, median:

- **path**: ``Outbox.accept`` (letter, 3 deliveries, route audit) then ``Deliverer.run_once`` (claim by
  letter, route, package + disclosure AuditEvent, JSON, send, ``finish_many`` with the audit chain; the
  log calls with logging switched off) then one idle ``run_once`` (the poll that finds nothing);
- **phases**: the same pieces called one by one (accept, claim, poll, build = ``package.message`` +
  ``audit.disclosure_event``, send = ``orjson.dumps`` + transport, finish = ``finish_many``).

The transport answers at once in process, or with ``--http`` it is the real ``HttpTransport`` POSTing
to a loopback receiver in another process (its CPU is not counted).

``--compare DIR`` runs this checkout and DIR (``PYTHONPATH=DIR``) in two processes side by side, which
measure ``--letters`` letters in turn, ``--rounds`` times each (the order alternating), in ``--pairs`` fresh
pairs of processes: the machine is shared and noisy, and its load then weighs on both alike.  It reports
the median over every letter of each side, the change, and the median of the batch-by-batch changes
("paired").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if not os.environ.get("BENCH_DELIVER_CHILD"):
    sys.path.insert(0, str(ROOT))  # a child imports ``gateway`` from its PYTHONPATH instead

FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PHASES = ("accept", "claim", "poll", "build", "send", "finish")

_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        header = json.loads(body)["entry"][0]["resource"]
        answer = json.dumps({"resourceType": "Bundle", "type": "message", "entry": [{"resource": {
            "resourceType": "MessageHeader", "response": {"identifier": header["id"], "code": "ok"}}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _letter(base: bytes, tag: str) -> bytes:
    start = base.index(b"<id ", base.index(b"<ClinicalDocument"))
    end = base.index(b"/>", start) + 2
    return base[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="BENCH-{tag}"/>'.encode() + base[end:]


class Answered:
    """A recipient that acknowledges at once (no network)."""

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = "") -> Any:
        from gateway.transports import Outcome

        return Outcome("ok", "acknowledged")

    def close(self) -> None:
        pass


@contextmanager
def _receiver(http: bool) -> Iterator[int]:
    if not http:
        yield 9
        return
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def _database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'gw.db'}"
        return
    from sqlalchemy import create_engine, text

    name = f"bench_deliver_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Rig:
    """An outbox, a worker and one translated letter, ready to be accepted again under new document ids."""

    def __init__(self, url: str, port: int, http: bool) -> None:
        import orjson

        from gateway import audit, package, pipeline, seal
        from gateway.deliver import Deliverer
        from gateway.demo import seed_store, social_permit
        from gateway.mappings import load_mappings
        from gateway.outbox import Outbox
        from gateway.route import route
        from gateway.settings import Settings
        from gateway.store import ResourceStore, StoreSnapshot, make_engine
        from gateway.translate.ids import resource_id
        from gateway.translate.registry import SECTION_TRANSLATORS
        from gateway.transports.http import HttpTransport

        self.orjson, self.audit, self.package, self.resource_id = orjson, audit, package, resource_id
        mappings = load_mappings(translators=SECTION_TRANSLATORS)
        self.settings = Settings()
        self.engine = make_engine(url)
        store = ResourceStore(engine=self.engine)
        seed_store(store, lambda ep: f"http://127.0.0.1:{port}/fhir/{ep}", consents=())
        store.put(
            "Consent", "bench-permit", social_permit(rid="bench-permit"),
            at=datetime.fromisoformat("2026-10-28T15:00:00+01:00"),
        )  # fmt: skip
        signer = seal.Signer(seal.generate_key())
        self.outbox = Outbox(self.engine, signer)
        self.transport: Any = HttpTransport() if http else Answered()
        self.worker = Deliverer(
            outbox=self.outbox, store=store, mappings=mappings, settings=self.settings, signer=signer,
            transports={"http": self.transport},
        )  # fmt: skip
        self.base = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()
        now = datetime.now(UTC)
        self.prepared = pipeline.prepare(self.base, name="letter", mappings=mappings, settings=self.settings, now=now)
        directory, consents = StoreSnapshot(store, self.prepared.policy).current()
        routing = route(self.prepared.resources, directory, self.prepared.policy)
        self.routing = routing
        self.route_events = [
            audit.route_event(e, self.prepared.patient, self.prepared.letter_key, now.isoformat(timespec="seconds"), i)
            for i, e in enumerate(routing.events)
        ]
        # what cut_for decides and cuts (not measured): once per recipient, reused for every letter
        self.cuts = {
            r.recipient.id: pipeline.cut_for(self.prepared, r, now, consents, self.settings) for r in routing.routed
        }
        sealed = seal.sign(next(iter(self.cuts.values())).message or {}, signer, now.isoformat(timespec="seconds"))
        self.signature = sealed["signature"]
        cuts, package_, audit_, Cut = self.cuts, package, audit, pipeline.Cut

        def fake_cut(prepared: Any, routed: Any, at: datetime, consents: Any, settings: Any, **kw: Any) -> Any:
            """cut_for with the decision and the view already made: packaging and audit only."""
            done = cuts[routed.recipient.id]
            recorded = at.isoformat(timespec="seconds")
            message = package_.message(
                done.view, prepared.letter_key, recorded, package_.Sender(endpoint=settings.public_url),
                prepared.rules.system, kw.get("replaces"),
            )  # fmt: skip
            event = audit_.disclosure_event(
                done.view, done.decision, prepared.patient, prepared.letter_key, recorded, message, routed.reasons
            )
            return Cut(done.decision, done.view, message, event)

        signature = self.signature

        def fake_sign(bundle: Any, signer: Any, when: str) -> Any:
            return {**{k: v for k, v in bundle.items() if k != "signature"}, "signature": {**signature, "when": when}}

        import gateway.deliver

        gateway.deliver.cut_for = fake_cut  # type: ignore[assignment]
        gateway.deliver.seal.sign = fake_sign  # type: ignore[assignment]
        self.fake_cut, self.fake_sign = fake_cut, fake_sign
        self.n = 0

    def _new(self) -> tuple[Any, list[tuple[str, str, str, str]]]:
        self.n += 1
        key = f"1.2.250.1.213.1.1.9.1.3|BENCH-{os.getpid()}-{self.n}"
        prepared = dataclasses.replace(self.prepared, letter_key=key)
        deliveries = [
            (
                self.resource_id("MessageHeader", key, r.recipient.id),
                r.recipient.id,
                r.recipient.ref,
                r.recipient.endpoint.address if r.recipient.endpoint else "",
            )
            for r in self.routing.routed
        ]
        return prepared, deliveries

    def _accept(self, prepared: Any, deliveries: Any, now: datetime) -> str:
        letter_id, created = self.outbox.accept(
            document_key=prepared.letter_key, set_key=None, version=1, client="his", media_type="application/xml",
            body=self.base, deliveries=deliveries, audit_events=self.route_events, now=now, hold=timedelta(seconds=5),
        )  # fmt: skip
        assert created
        return letter_id

    def path(self) -> float:
        """One letter through accept + a worker batch + an idle poll: CPU seconds."""
        prepared, deliveries = self._new()
        clock = time.thread_time
        start = clock()
        letter_id = self._accept(prepared, deliveries, datetime.now(UTC))
        self.worker.remember(letter_id, prepared)
        done = self.worker.run_once()
        idle = self.worker.run_once()
        spent = clock() - start
        assert done == len(deliveries) and idle == 0, (done, idle)
        return spent

    def phases(self) -> dict[str, float]:
        """The same pieces called one by one: CPU seconds of each."""
        from gateway.outbox import Finish

        prepared, deliveries = self._new()
        clock = time.thread_time
        out: dict[str, float] = {}
        now = datetime.now(UTC)
        lease = timedelta(seconds=60)
        t0 = clock()
        letter_id = self._accept(prepared, deliveries, now)
        t1 = clock()
        claimed = self.outbox.claim("bench-worker", now, 160, lease, letters=[letter_id])
        t2 = clock()
        polled = self.outbox.claim("bench-worker", now, 10, lease)
        t3 = clock()
        assert len(claimed) == len(deliveries) and polled == []
        routed = {r.recipient.id: r for r in self.routing.routed}
        cuts = [self.fake_cut(prepared, routed[d.recipient_id], now, None, self.settings) for d in claimed]
        t4 = clock()
        finishes = []
        for delivery, cut in zip(claimed, cuts, strict=True):
            sealed = self.fake_sign(cut.message, None, now.isoformat(timespec="seconds"))
            outcome = self.transport.send(self.orjson.dumps(sealed), delivery.endpoint, delivery.message_id)
            assert outcome.kind == "ok", outcome
            event = {**cut.event, "outcomeDesc": f"{cut.event['outcomeDesc']}; attempt 1: {outcome.detail}; signed"}
            finishes.append(
                Finish(delivery.message_id, delivery.letter_id, "acknowledged", delivery.recipient_id,
                       audit_events=[event])
            )  # fmt: skip
        t5 = clock()
        recorded = self.outbox.finish_many(finishes, "bench-worker", datetime.now(UTC))
        t6 = clock()
        assert all(recorded)
        for name, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)), strict=True):
            out[name] = b - a
        return out

    def close(self) -> None:
        self.worker.close()
        self.outbox.reader.dispose()
        self.engine.dispose()


Samples = dict[str, list[float]]  # "path" and each phase: CPU seconds of each letter


def _measure(rig: Rig, letters: int) -> Samples:
    samples: Samples = {"path": [], **{p: [] for p in PHASES}}
    for _ in range(letters):
        samples["path"].append(rig.path())
        for name, spent in rig.phases().items():
            samples[name].append(spent)
    return samples


@contextmanager
def _rig(db: str, http: bool, warm: int = 20) -> Iterator[Rig]:
    import gc
    import logging

    logging.disable(logging.CRITICAL)  # the worker's log lines are built but not written to a terminal
    with tempfile.TemporaryDirectory() as tmp, _receiver(http) as port, _database(db, Path(tmp)) as url:
        rig = Rig(url, port, http)
        try:
            _measure(rig, warm)
            gc.collect()
            gc.disable()  # as in ``gateway serve`` (a collector thread frees cycles now and then)
            yield rig
        finally:
            gc.enable()
            rig.close()


def _ms(samples: Samples) -> dict[str, float]:
    """Per-letter medians in milliseconds: ``path``, each phase, and the phases' ``sum``."""
    result = {key: statistics.median(values) * 1000 for key, values in samples.items()}
    result["sum"] = sum(result[p] for p in PHASES)
    return result


def serve(db: str, http: bool) -> None:
    """Child of ``--compare``: after warming up, measure ``N`` letters for each ``N`` read on stdin."""
    with _rig(db, http) as rig:
        print("ready", flush=True)
        for line in sys.stdin:
            if not int(line):
                break
            print(json.dumps(_measure(rig, int(line))), flush=True)


class _Side:
    """One checkout's benchmark process, measuring when asked."""

    def __init__(self, checkout: Path, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": str(checkout), "BENCH_DELIVER_CHILD": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--db", args.db, *(["--http"] * args.http)]
        self.checkout = checkout
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.samples: Samples = {}
        self.batches: list[dict[str, float]] = []

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the benchmark on {self.checkout} stopped (exit {self.proc.wait()})")
        return line

    def ready(self) -> None:
        while self._line().strip() != "ready":
            pass

    def measure(self, letters: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{letters}\n")
        self.proc.stdin.flush()
        batch: Samples = json.loads(self._line())
        for key, values in batch.items():
            self.samples.setdefault(key, []).extend(values)
        self.batches.append(_ms(batch))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("0\n")
        self.proc.stdin.close()
        self.proc.wait()


def compare(other: Path, args: argparse.Namespace) -> None:
    """Both checkouts side by side: ``--pairs`` pairs of processes, each measuring ``--rounds`` batches of
    ``--letters`` letters in turn (the order alternating), so that what the machine's other load does to
    one side it does to the other within seconds."""
    mine: list[_Side] = []
    theirs: list[_Side] = []
    for pair in range(args.pairs):
        this, that = _Side(ROOT, args), _Side(other, args)
        this.ready()
        that.ready()
        for r in range(args.rounds):
            for side in (this, that) if (r + pair) % 2 == 0 else (that, this):
                side.measure(args.letters)
        this.close()
        that.close()
        mine.append(this)
        theirs.append(that)
        print(f"pair {pair + 1}/{args.pairs}: path this {_ms(this.samples)['path']:.3f} ms, "
              f"other {_ms(that.samples)['path']:.3f} ms", file=sys.stderr, flush=True)  # fmt: skip
    a = _ms({k: [v for s in mine for v in s.samples[k]] for k in mine[0].samples})
    b = _ms({k: [v for s in theirs for v in s.samples[k]] for k in theirs[0].samples})
    print(f"{'ms CPU / letter':16} {'this':>9} {'other':>9} {'change':>8} {'paired':>8}")
    for key in ("path", *PHASES, "sum"):
        ratios = [m[key] / t[key] - 1 for x, y in zip(mine, theirs, strict=True) for m, t in zip(x.batches, y.batches, strict=True)]  # fmt: skip
        print(f"{key:16} {a[key]:9.3f} {b[key]:9.3f} {100 * (a[key] / b[key] - 1):+7.1f}% {100 * statistics.median(ratios):+7.1f}%")  # fmt: skip
    print(f"(this = {ROOT}, other = {other}; {args.pairs} process pairs × {args.rounds} alternating batches × "
          f"{args.letters} letters, db {args.db}, {'HTTP loopback' if args.http else 'in-process transport'})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", type=int, default=None, help="letters measured (per batch with --compare: 10)")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--http", action="store_true", help="send over HTTP to a loopback receiver process")
    parser.add_argument("--compare", type=Path, help="another checkout to run interleaved against this one")
    parser.add_argument("--rounds", type=int, default=30, help="batches per process with --compare")
    parser.add_argument("--pairs", type=int, default=3, help="process pairs with --compare")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.db, args.http)
        return 0
    if args.compare is not None:
        args.letters = args.letters or 10
        compare(args.compare.resolve(), args)
        return 0
    with _rig(args.db, args.http) as rig:
        result = _ms(_measure(rig, args.letters or 150))
    for key, value in result.items():
        print(f"{key:8} {value:8.3f} ms CPU / letter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
