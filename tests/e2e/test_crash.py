"""Crash test: real ``gateway serve`` and ``gateway receiver`` processes; the gateway is killed with
SIGKILL at random moments while letters are being pushed and delivered, then restarted.

Bar: every message is delivered exactly once after receiver de-duplication (0 lost, 0 duplicated),
each letter is stored once although the hospital resent it after a lost answer, and every status ends
``acknowledged``.  The seed is printed so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine, func, select, text

from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.seal import generate_key
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES
from tests.e2e.test_service import _free_port

DISPATCH = FIXTURES / "dispatch"
HIS = "his-key-crash-0123456789abcdef"
GATEWAY = str(Path(sys.executable).with_name("gateway"))
LETTERS = 20


def _wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _letter(n: int) -> bytes:
    raw = (DISPATCH / "ldl-ses-s1-pharmacy.xml").read_bytes()
    return raw.replace(b"LDL-SES-20261030-000458", f"LDL-SES-CRASH-{n:04d}".encode())


class Gateway:
    def __init__(self, tmp: Path, url: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": url,
            "GATEWAY_API_KEYS": f"{HIS}:his",
            "GATEWAY_SIGNING_KEY_FILE": str(tmp / "gateway.jwk"),
            "GATEWAY_CLAIM_LEASE_SECONDS": "2",
            "GATEWAY_RETRY_INITIAL_SECONDS": "0.2",
            "GATEWAY_RETRY_MAX_SECONDS": "1",
        }
        self.log = open(tmp / "gateway.log", "ab")  # noqa: SIM115 - kept open across restarts
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [GATEWAY, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=self.log,
        )
        _wait_http(f"{self.url}/healthz", self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def crash_world(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    key = generate_key()
    (tmp_path / "gateway.jwk").write_bytes(orjson.dumps(key.as_dict(private=True)))
    (tmp_path / "public.jwk").write_bytes(orjson.dumps(key.as_dict(private=False)))
    rx_port = _free_port()
    receiver = subprocess.Popen(
        [
            GATEWAY,
            "receiver",
            "--port",
            str(rx_port),
            "--db",
            f"sqlite:///{tmp_path / 'rx.db'}",
            "--trust",
            str(tmp_path / "public.jwk"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = database_url
    engine = make_engine(url)
    store = ResourceStore(engine=engine)
    seed_store(store, lambda ep: f"http://127.0.0.1:{rx_port}/fhir/{ep}")
    gateway = Gateway(tmp_path, url)
    try:
        _wait_http(f"http://127.0.0.1:{rx_port}/messages", receiver)
        yield {"gateway": gateway, "engine": engine, "rx_db": tmp_path / "rx.db", "rx_port": rx_port}
    finally:
        gateway.stop()
        receiver.terminate()
        receiver.wait(10)
        engine.dispose()


def push_until_answered(url: str, n: int, stop: threading.Event | None = None) -> tuple[str, int] | None:
    """The hospital side: push letter ``n`` until it gets an answer (resending after a lost one or a 5xx
    while the gateway dies); (letter id, resends), or None if stopped first."""
    tries = 0
    while stop is None or not stop.is_set():
        tries += 1
        try:
            answer = httpx.post(
                f"{url}/letters",
                content=_letter(n),
                headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
                timeout=10,
            )
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if answer.status_code in (200, 202):
            return str(answer.json()["letterId"]), tries - 1
        time.sleep(0.05)
    return None


def _push_all(gateway: Gateway, answers: dict[int, str], stop: threading.Event, resends: list[int]) -> None:
    for n in range(LETTERS):
        found = push_until_answered(gateway.url, n, stop)
        if found is None:
            return
        answers[n], again = found
        resends.append(again)


def test_kill_9_at_random_moments_loses_nothing_and_duplicates_nothing(crash_world: dict[str, Any]) -> None:
    seed = random.randrange(1_000_000)
    print(f"crash test seed {seed}")
    rng = random.Random(seed)
    gateway: Gateway = crash_world["gateway"]
    gateway.start()
    answers: dict[int, str] = {}
    stop = threading.Event()
    resends: list[int] = []
    pusher = threading.Thread(target=_push_all, args=(gateway, answers, stop, resends), daemon=True)
    pusher.start()
    for _ in range(4):
        time.sleep(rng.uniform(0.1, 1.2))
        gateway.kill()
        time.sleep(rng.uniform(0.0, 0.3))
        gateway.start()
    pusher.join(120)
    stop.set()
    assert len(answers) == LETTERS, f"every letter was eventually accepted ({len(answers)}/{LETTERS})"

    outbox = Outbox(crash_world["engine"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        states = {d.status for d in outbox.deliveries()}
        if states == {"acknowledged"}:
            break
        time.sleep(0.25)
    deliveries = outbox.deliveries()
    assert {d.status for d in deliveries} == {"acknowledged"}, {d.message_id: d.status for d in deliveries}

    with crash_world["engine"].connect() as conn:
        letters = conn.execute(text("SELECT COUNT(*) FROM letter")).scalar()
    assert letters == LETTERS, "a resent letter is stored once"
    assert len(deliveries) == LETTERS * 6
    assert len({d.message_id for d in deliveries}) == len(deliveries)

    rx = create_engine(f"sqlite:///{crash_world['rx_db']}")
    with rx.connect() as conn:
        received = [r.message_id for r in conn.execute(text("SELECT message_id FROM received_message"))]
        total = conn.execute(select(func.count()).select_from(text("received_message"))).scalar()
    rx.dispose()
    print(
        f"crash test: {LETTERS} letters, {len(deliveries)} messages, 4 kills, {sum(resends)} resent pushes, "
        f"{sum(d.attempts - 1 for d in deliveries)} extra delivery attempts, {len(received)} received once each"
    )
    assert total == len(received) == len(set(received))
    assert set(received) == {d.message_id for d in deliveries}, "0 lost, 0 extra"
