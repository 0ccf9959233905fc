"""Claiming from the outbox (one statement: pick, mark ``sending``, read back), on SQLite and PostgreSQL.

A claim takes at most ``limit`` due deliveries and never one another worker holds; deliveries held for
the process that accepted their letter are claimed by letter at once, by anyone else only when the
hold is over; a crashed worker's claim is retaken after its lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from gateway.outbox import Outbox
from gateway.store import make_engine

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture
def outbox(database_url: str) -> Iterator[Outbox]:
    engine = make_engine(database_url)
    found = Outbox(engine)
    yield found
    found.reader.dispose()
    engine.dispose()


def _accept(outbox: Outbox, n: int, recipients: int = 3, hold: timedelta = timedelta(0)) -> tuple[str, set[str]]:
    deliveries = [
        (str(uuid.uuid4()), f"recipient-{r}", f"Practitioner/p{r}", "https://127.0.0.1:9/fhir")
        for r in range(recipients)
    ]
    letter_id, created = outbox.accept(
        document_key=f"urn:oid:1.2.250.1.999|claim-{n}",
        set_key=None,
        version=None,
        client="test",
        media_type="application/hl7-cda+xml",
        body=b"<ClinicalDocument/>",
        deliveries=deliveries,
        audit_events=[],
        now=NOW,
        hold=hold,
    )
    assert created
    return letter_id, {d[0] for d in deliveries}


def test_a_claim_takes_at_most_its_limit_and_never_what_another_holds(outbox: Outbox) -> None:
    expected = set().union(*(_accept(outbox, n)[1] for n in range(5)))
    first = outbox.claim("w1", NOW, limit=2)
    second = outbox.claim("w2", NOW, limit=4)
    assert len(first) == 2 and len(second) == 4
    assert {d.status for d in first + second} == {"sending"}
    assert not {d.message_id for d in first} & {d.message_id for d in second}
    rest = outbox.claim("w3", NOW, limit=100)
    assert len(rest) == 15 - 6
    assert {d.message_id for d in first + second + rest} == expected
    assert outbox.claim("w4", NOW, limit=100) == [], "nothing left to claim"
    lease = timedelta(minutes=2)
    retaken = outbox.claim("w5", NOW + lease + timedelta(seconds=1), limit=100, lease=lease)
    assert len(retaken) == 15, "every claim whose lease expired is retaken"
    assert {d.message_id for d in outbox.deliveries() if d.status == "sending"} == expected


def test_held_deliveries_go_to_the_accepting_worker_first(outbox: Outbox) -> None:
    hold = timedelta(seconds=5)
    mine, my_messages = _accept(outbox, 1, hold=hold)
    _other, other_messages = _accept(outbox, 2, hold=hold)
    assert outbox.claim("another-process", NOW, limit=100) == [], "held for the process that accepted them"
    taken = outbox.claim("accepting-process", NOW, limit=100, letters=[mine])
    assert {d.message_id for d in taken} == my_messages, "by letter: exactly that letter's deliveries"
    assert outbox.claim("accepting-process", NOW, limit=100, letters=[mine]) == [], "claimed once"
    later = outbox.claim("another-process", NOW + hold, limit=100)
    assert {d.message_id for d in later} == other_messages, "after the hold, anyone takes them"
