"""Claiming from the outbox (one statement: pick, mark ``sending``, read back), on SQLite and PostgreSQL.

A claim takes at most ``limit`` due deliveries and never one another worker holds; deliveries held for
the process that accepted their letter are claimed by letter at once, by anyone else only when the
hold is over; a crashed worker's claim is retaken after its lease.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.outbox import Outbox
from tests.e2e.test_workers_pg import accept_letters

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_a_claim_takes_at_most_its_limit_and_never_what_another_holds(outbox: Outbox) -> None:
    expected = accept_letters(outbox, 5, 3, NOW)
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
    my_messages = accept_letters(outbox, 1, 3, NOW, hold=hold)
    other_messages = accept_letters(outbox, 1, 3, NOW, hold=hold, first=1)
    mine = next(d.letter_id for d in outbox.deliveries() if d.message_id in my_messages)
    assert outbox.claim("another-process", NOW, limit=100) == [], "held for the process that accepted them"
    taken = outbox.claim("accepting-process", NOW, limit=100, letters=[mine])
    assert {d.message_id for d in taken} == my_messages, "by letter: exactly that letter's deliveries"
    assert outbox.claim("accepting-process", NOW, limit=100, letters=[mine]) == [], "claimed once"
    later = outbox.claim("another-process", NOW + hold, limit=100)
    assert {d.message_id for d in later} == other_messages, "after the hold, anyone takes them"
