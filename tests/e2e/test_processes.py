"""``gateway serve --processes 2``: two workers behind one port, supervised.

Real processes (supervisor, workers, reference receiver) on SQLite and PostgreSQL: letters pushed
while one worker is killed with SIGKILL are all delivered exactly once; the dead worker is replaced;
``/metrics`` counts every accepted letter whichever worker answers the scrape; killing the supervisor
takes its workers with it (no orphan keeps the port).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from gateway.outbox import Outbox
from tests.e2e.test_crash import Gateway, crash_world, push_until_answered

__all__ = ["crash_world"]  # the fixture, shared with the crash test

LETTERS = 10


def _workers(supervisor: int) -> set[int]:
    """The live children of ``supervisor`` (from /proc: the parent pid is the 4th field of stat)."""
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[1]) == supervisor and fields[0] != "Z":
                children.add(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait(check: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _push(gateway: Gateway, n: int) -> str:
    found = push_until_answered(gateway.url, n)  # a connection cut by the killed worker: pushed again
    assert found is not None
    return found[0]


def _accepted(gateway: Gateway) -> float:
    scrape = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(scrape):
        if family.name == "gateway_letters_accepted":
            return sum(
                s.value for s in family.samples if s.labels.get("source") == "http" and s.name.endswith("_total")
            )
    return 0.0


def test_two_workers_share_the_port_survive_a_kill_and_die_with_the_supervisor(crash_world: dict[str, Any]) -> None:
    gateway: Gateway = crash_world["gateway"]
    gateway.env["GATEWAY_PROCESSES"] = "2"
    gateway.start()
    assert gateway.proc is not None
    supervisor = gateway.proc.pid

    def two_workers(without: int = -1) -> set[int] | None:
        found = _workers(supervisor)
        return found if len(found) == 2 and without not in found else None

    first = _wait(two_workers, 30, "two workers")

    ids = [_push(gateway, n) for n in range(LETTERS // 2)]
    victim = min(first)  # killed in the middle of the pushes
    os.kill(victim, signal.SIGKILL)
    ids += [_push(gateway, n) for n in range(LETTERS // 2, LETTERS)]
    replaced = _wait(lambda: two_workers(without=victim), 30, "a new worker")
    assert victim not in replaced and len(replaced) == 2

    outbox = Outbox(crash_world["engine"])
    _wait(lambda: {d.status for d in outbox.deliveries()} == {"acknowledged"}, 60, "every delivery acknowledged")
    deliveries = outbox.deliveries()
    assert len(set(ids)) == LETTERS
    assert len(deliveries) == LETTERS * 6
    rx = create_engine(f"sqlite:///{crash_world['rx_db']}")
    with rx.connect() as conn:
        received = [r.message_id for r in conn.execute(text("SELECT message_id FROM received_message"))]
    rx.dispose()
    assert sorted(received) == sorted(d.message_id for d in deliveries), "each message received exactly once"

    # every scrape, whichever worker answers it, counts the letters of both (the killed one's included)
    counts = {_accepted(gateway) for _ in range(6)}
    assert counts == {float(LETTERS)}, counts

    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait()
    _wait(lambda: not any(_alive(pid) for pid in replaced), 15, "the workers to die with their supervisor")
    gateway.proc = None
