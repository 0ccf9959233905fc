"""Retention: a letter's content is erased once its retention period is over and every delivery of it is
final — never while it may still be sent or replayed — and the erasure is in the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from gateway.auditlog import verify
from tests.e2e.test_service import ADMIN, HIS, world
from tests.e2e.test_versions import _version

__all__ = ["world"]  # the fixture, re-exported for pytest

HEADERS = {"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"}


def _bodies(world: dict[str, Any]) -> dict[str, int]:
    with world["engine"].connect() as conn:
        return {str(i): int(n) for i, n in conn.execute(text("SELECT id, length(body) FROM letter"))}


def test_only_letters_whose_deliveries_are_final_lose_their_content(world: dict[str, Any]) -> None:
    client, worker, outbox = world["client"], world["worker"], world["outbox"]
    delivered = client.post("/letters", content=_version(1), headers=HEADERS).json()["letterId"]
    assert worker.run_once() == 6
    world["receiver"].stop()  # the next letter cannot be delivered: it waits, retrying
    waiting = client.post("/letters", content=_version(1).replace(b"-V1", b"-W1"), headers=HEADERS).json()["letterId"]
    worker.run_once()
    later = datetime.now(UTC) + timedelta(days=31)
    assert _bodies(world)[delivered] > 0 and _bodies(world)[waiting] > 0

    assert outbox.erase_letters(datetime.now(UTC) - timedelta(days=30), later, "30 days") == [], "too recent"
    assert outbox.erase_letters(later - timedelta(days=30), later, "30 days") == [delivered]
    assert _bodies(world) == {delivered: 0, waiting: _bodies(world)[waiting]} and _bodies(world)[waiting] > 0
    assert outbox.erase_letters(later - timedelta(days=30), later, "30 days") == [], "erased once"

    status = client.get(f"/letters/{delivered}", headers={"Authorization": f"Bearer {HIS}"})
    assert status.status_code == 200 and {d["status"] for d in status.json()["deliveries"]} == {"acknowledged"}
    again = client.post("/letters", content=_version(1), headers=HEADERS)
    assert again.status_code == 200 and again.json()["duplicate"], "an erased letter is still known"
    trail = client.get(f"/AuditEvent?letter={delivered}&_count=500", headers={"Authorization": f"Bearer {ADMIN}"})
    erasures = [e["resource"] for e in trail.json()["entry"] if e["resource"]["action"] == "D"]
    assert len(erasures) == 1
    assert erasures[0]["entity"][0]["what"]["reference"] == f"Letter/{delivered}"
    assert "30 days" in erasures[0]["outcomeDesc"]
    assert verify(world["engine"], [outbox.log.signer.key]).ok, "the chain holds the erasures"
