"""Load benchmark: letters accepted and acknowledged end to end, on this machine, over loopback.

    python bench/bench_load.py [--db sqlite|postgresql] [--letters 400] [--rate 50] [--processes 2] [--gateways 1]
                               [--patients 0]

Real processes: ``gateway serve`` (API + delivery worker; ``--processes N`` is ``serve --processes N``,
N workers behind one port; ``--gateways 2`` runs two separate ``serve`` on one database)
and ``gateway receiver`` (verifies each seal, de-duplicates, stores, acknowledges).  The letter is the
S6 discharge letter routed to 3 recipients (GP, CLIC, SAAD — the social ones with the patient's
consent to logistics and social data), each one a distinct document.  ``--patients N`` adds N other
patients' consents to the store (a tenth of them under guardianship), as a hospital's store holds them.

Two runs:
- **throughput**: push every letter as fast as the API takes them (16 concurrent clients), then wait
  for every message to be acknowledged: letters/s = letters ÷ (first push → last acknowledgement);
- **latency**: push at a steady ``--rate`` letters/s; accept-to-ack = the gateway's own timestamps
  (letter received → its last recipient's acknowledgement), p50 / p99.
Goal (issue 4): ≥ 200 letters/s, p99 < 250 ms at 50 letters/s.  Everything shares the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from gateway.demo import seed_store, social_permit  # noqa: E402
from gateway.seal import generate_key  # noqa: E402
from gateway.store import ResourceStore, make_engine  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"
GATEWAY = str(Path(sys.executable).with_name("gateway"))
HIS = "his-key-bench-0123456789abcdef"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


class Rig:
    """Receiver + gateway processes on one fresh database."""

    def __init__(self, db: str, gateways: int, tmp: Path, processes: int = 1, patients: int = 0) -> None:
        self.tmp, self.procs = tmp, []  # type: ignore[var-annotated]
        key = generate_key()
        (tmp / "gw.jwk").write_bytes(orjson.dumps(key.as_dict(private=True)))
        (tmp / "pub.jwk").write_bytes(orjson.dumps(key.as_dict(private=False)))
        if db == "postgresql":
            name = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(
                PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            self.url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
            self.drop = name
        else:
            self.url, self.drop = f"sqlite:///{tmp / 'gw.db'}", ""
        rx_port = _port()
        self.procs.append(
            subprocess.Popen(
                [
                    GATEWAY,
                    "receiver",
                    "--port",
                    str(rx_port),
                    "--db",
                    f"sqlite:///{tmp / 'rx.db'}",
                    "--trust",
                    str(tmp / "pub.jwk"),
                    "--log-level",
                    "WARNING",  # no line per message: the receiver stands for a hospital's, not for a log
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.engine = make_engine(self.url)
        store = ResourceStore(engine=self.engine)
        seed_store(store, lambda ep: f"http://127.0.0.1:{rx_port}/fhir/{ep}", consents=())
        store.put(
            "Consent",
            "bench-permit",
            social_permit(rid="bench-permit"),
            at=datetime.fromisoformat("2026-10-28T15:00:00+01:00"),
        )
        _other_patients(store, patients)
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": self.url,
            "GATEWAY_API_KEYS": f"{HIS}:his",
            "GATEWAY_SIGNING_KEY_FILE": str(tmp / "gw.jwk"),
        }
        self.urls = []
        for _ in range(gateways):
            port = _port()
            self.procs.append(
                subprocess.Popen(
                    [GATEWAY, "serve", "--quiet", "--port", str(port), "--processes", str(processes)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp / f"gw-{port}.log", "wb"),  # noqa: SIM115
                )
            )
            self.urls.append(f"http://127.0.0.1:{port}")
        _wait(f"http://127.0.0.1:{rx_port}/messages")
        for url in self.urls:
            _wait(f"{url}/healthz")

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the gateway processes and by the receiver."""
        gateways = sum(_cpu_seconds(p.pid) for p in self.procs[1:])
        return gateways, _cpu_seconds(self.procs[0].pid)

    def close(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.engine.dispose()
        if self.drop:
            admin = create_engine(
                PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.drop}" WITH (FORCE)'))
            admin.dispose()

    def pending(self, letters: set[str]) -> int:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT letter_id, status FROM delivery")).all()
        return sum(1 for r in rows if r.letter_id in letters and r.status != "acknowledged")

    def latencies(self, letters: set[str]) -> list[float]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT l.id, l.received_at, d.acknowledged_at FROM letter l JOIN delivery d ON d.letter_id = l.id"
                )
            ).all()
        done: dict[str, tuple[Any, Any]] = {}
        for r in rows:
            if r.id in letters and r.acknowledged_at is not None:
                start, end = done.get(r.id, (_dt(r.received_at), _dt(r.acknowledged_at)))
                done[r.id] = (start, max(end, _dt(r.acknowledged_at)))
        return [(_dt(end) - _dt(start)).total_seconds() * 1000 for start, end in done.values()]


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _other_patients(store: ResourceStore, count: int) -> None:
    """``count`` other patients' consents (and a guardian for every tenth), as a hospital's store holds them:
    what a decision must not have to read through for the one patient it decides for."""
    permit = social_permit(rid="other")
    when = datetime.fromisoformat("2026-10-01T10:00:00+02:00")
    with store.engine.begin() as conn:
        for n in range(count):
            patient = {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": f"2{n:014d}"}}
            store.put_in(conn, "Consent", f"other-{n}", {**permit, "id": f"other-{n}", "patient": patient}, when)
            if n % 10 == 0:
                guardian = {
                    "resourceType": "RelatedPerson",
                    "patient": patient,
                    "relationship": [
                        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "GUARD"}]}
                    ],
                    "period": {"start": "2019-06-20"},
                }
                store.put_in(conn, "RelatedPerson", f"guardian-{n}", guardian, when)


def _cpu_seconds(root: int) -> float:
    """CPU time (user + system) of ``root`` and its live children (the workers of ``serve --processes``)."""
    pids = [root] + [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and (f := _stat(int(e.name))) and int(f[1]) == root
    ]
    return sum((int(f[11]) + int(f[12])) / _TICK for pid in pids if (f := _stat(pid)))


def _dt(value: Any) -> datetime:
    found = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return found.replace(tzinfo=None)


BASE = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()


def _letter(tag: str) -> bytes:
    start = BASE.index(b"<id ", BASE.index(b"<ClinicalDocument"))
    end = BASE.index(b"/>", start) + 2
    return BASE[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="BENCH-{tag}"/>'.encode() + BASE[end:]


class _Connection:
    """One keep-alive HTTP/1.1 connection of the load client: a request written, its answer read.

    httpx's AsyncClient cost ~2.2 ms of CPU per letter here, on the same 2 cores as the gateway; this
    costs a fraction of that, so the figures measure the gateway, not the client."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        status_line = await reader.readline()
        if not status_line:
            raise SystemExit(f"{self.host}:{self.port} closed the connection")
        status, length, close = int(status_line.split()[1]), 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        answer = await reader.readexactly(length)
        if close:
            writer.close()
            self.streams = None
        return status, answer

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def _push(urls: list[str], count: int, rate: float, tag: str) -> tuple[set[str], float]:
    """Push ``count`` letters (round-robin over the gateways), at ``rate``/s or as fast as possible,
    over 16 connections (a letter waits for a free one)."""
    ids: set[str] = set()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    every = [_Connection(urls[n % len(urls)]) for n in range(16)]
    for connection in every:
        idle.put_nowait(connection)
    headers = {"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}

    async def one(n: int) -> None:
        connection = await idle.get()
        try:
            status, answer = await connection.post("/letters", _letter(f"{tag}-{n}"), headers)
        finally:
            idle.put_nowait(connection)
        if status != 202:
            raise SystemExit(f"push refused: {status} {answer[:300]!r}")
        ids.add(orjson.loads(answer)["letterId"])

    started = time.perf_counter()
    tasks = []
    for n in range(count):
        if rate > 0:
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for connection in every:
            connection.close()
    return ids, started


def _drain(rig: Rig, ids: set[str], seconds: float = 600) -> float:
    deadline = time.monotonic() + seconds
    while rig.pending(ids):
        if time.monotonic() > deadline:
            raise SystemExit("deliveries did not complete")
        time.sleep(0.05)
    return time.perf_counter()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--letters", type=int, default=400)
    parser.add_argument("--rate", type=float, default=50.0, help="letters/s for the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--gateways", type=int, default=1, help="separate gateway services on one database")
    parser.add_argument("--processes", type=int, default=2, help="worker processes per gateway service")
    parser.add_argument(
        "--patients", type=int, default=0, help="other patients' consents in the store (a guardian for every tenth)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(args.db, args.gateways, Path(tmp), args.processes, args.patients)
        try:
            asyncio.run(_push(rig.urls, 20, 0, "warm"))
            _drain(rig, set())
            time.sleep(1)
            cpu_before, own_before = rig.cpu(), time.process_time()
            ids, started = asyncio.run(_push(rig.urls, args.letters, 0, "burst"))
            accepted = time.perf_counter()
            finished = _drain(rig, ids)
            (gw_after, rx_after), own_after = rig.cpu(), time.process_time()
            print(
                f"[{args.db}, {args.gateways} gateway(s) × {args.processes} process(es), 3 recipients/letter] throughput: {args.letters} letters "
                f"accepted in {accepted - started:.2f} s ({args.letters / (accepted - started):.0f}/s), all acknowledged "
                f"after {finished - started:.2f} s → {args.letters / (finished - started):.0f} letters/s end to end "
                f"({3 * args.letters / (finished - started):.0f} messages/s)"
            )
            per = 1000 / args.letters
            print(
                f"[{args.db}] CPU per letter: gateway {(gw_after - cpu_before[0]) * per:.1f} ms, receiver "
                f"{(rx_after - cpu_before[1]) * per:.1f} ms, load client {(own_after - own_before) * per:.1f} ms "
                f"(2 cores = {2000 * (finished - started) / args.letters:.1f} ms of CPU per letter at this rate)"
            )
            count = int(args.rate * args.seconds)
            ids, started = asyncio.run(_push(rig.urls, count, args.rate, "paced"))
            _drain(rig, ids)
            lat = rig.latencies(ids)
            print(
                f"[{args.db}] latency at {args.rate:.0f} letters/s for {args.seconds:.0f} s ({len(lat)} letters): "
                f"accept→last ack p50 {statistics.median(lat):.0f} ms, p99 {_pct(lat, 0.99):.0f} ms, max {max(lat):.0f} ms"
            )
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
