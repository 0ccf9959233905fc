"""A letter is translated once: what a process accepts stays its own while it lives, on SQLite and PostgreSQL.

- ``Outbox.accept`` marks the deliveries of a process with a delivery worker (``Outbox.holder``) as held
  for it; ``Outbox.renew_hold`` keeps them out of everyone else's claims while the holder lives (only
  those accepted after ``since``), and they fall due to others when the last hold ends;
- two ``Deliverer`` s on one database stand for two ``gateway serve`` processes: the one that accepted
  a letter delivers it without translating it again, however long its backlog; the other takes the
  deliveries (translating the letter once) only after the accepting one stopped renewing — killed — or,
  from a holder alive but far behind, its letters waiting longer than the patience;
- a claim whose limit cuts a letter takes the rest of that letter too (no letter split between workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import deliver
from gateway.deliver import Deliverer
from gateway.demo import seed_store, social_permit
from gateway.intake import Intake
from gateway.mappings import Mappings
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from gateway.transports import Outcome
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_workers_pg import accept_letters
from tests.fuzz.world import Recording

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOLD = timedelta(seconds=5)
LETTER = (FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml").read_bytes()
KEY = generate_key()


def _letter(tag: str) -> bytes:
    start = LETTER.index(b"<id ", LETTER.index(b"<ClinicalDocument"))
    end = LETTER.index(b"/>", start) + 2
    return LETTER[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="HOLD-{tag}"/>'.encode() + LETTER[end:]


def _holders(outbox: Outbox) -> dict[str, tuple[str, datetime]]:
    with outbox.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT message_id, claimed_by FROM delivery").all()
    due = {d.message_id: d.due_at for d in outbox.deliveries()}
    return {m: (h, due[m]) for m, h in rows}


def test_a_holder_keeps_its_deliveries_while_it_renews_and_loses_them_when_it_stops(outbox: Outbox) -> None:
    plain = accept_letters(outbox, 1, 2, NOW, hold=HOLD)  # no delivery worker in this process: a plain hold
    outbox.holder = "accepting"
    held = accept_letters(outbox, 2, 3, NOW, hold=HOLD, first=1)
    unheld = accept_letters(outbox, 1, 2, NOW, first=3)  # no hold asked: nothing to hold either
    holders = _holders(outbox)
    assert {holders[m] for m in held} == {("accepting", NOW + HOLD)}
    assert {holders[m] for m in plain} == {(None, NOW + HOLD)}
    assert {holders[m] for m in unheld} == {(None, NOW)}

    assert outbox.renew_hold("accepting", NOW + 2 * HOLD, NOW - timedelta(seconds=30)) == len(held)
    assert outbox.renew_hold("another", NOW + 3 * HOLD, NOW - timedelta(seconds=30)) == 0, "only its own"
    taken = outbox.claim("other-process", NOW + HOLD, limit=100)
    assert {d.message_id for d in taken} == plain | unheld, "the renewed hold keeps the others out"
    assert {d.message_id for d in outbox.claim("other-process", NOW + 2 * HOLD, limit=100)} == held, (
        "once the holder stopped renewing, its last hold over, anyone takes them"
    )
    assert outbox.renew_hold("accepting", NOW + 4 * HOLD, NOW - timedelta(seconds=30)) == 0, "claimed: not held"


def test_only_recent_deliveries_are_renewed(outbox: Outbox) -> None:
    outbox.holder = "accepting"
    old = accept_letters(outbox, 1, 3, NOW - timedelta(seconds=40), hold=HOLD)
    recent = accept_letters(outbox, 1, 3, NOW, hold=HOLD, first=1)
    assert outbox.renew_hold("accepting", NOW + HOLD, NOW - timedelta(seconds=30)) == len(recent)
    assert {d.message_id for d in outbox.claim("idle-process", NOW, limit=100)} == old


def _world(url: str) -> tuple[ResourceStore, Outbox]:
    engine = make_engine(url)
    return ResourceStore(engine=engine), Outbox(engine)


class _Sending(Recording):
    """Acknowledges everything; keeps the message ids it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        self.ids.append(message_id)
        return super().send(payload, endpoint, message_id)


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _process(url: str, clock: _Clock, transport: Recording, maps: Mappings) -> tuple[Deliverer, Intake, Outbox]:
    """What one ``gateway serve`` process wires: its own outbox and store, a delivery worker, the intake."""
    store, outbox = _world(url)
    settings = Settings()
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=maps,
        settings=settings,
        signer=Signer(KEY),
        transports={"https": transport},
        clock=clock,
    )
    return worker, Intake(settings, store, outbox, maps, on_accepted=worker.remember), outbox


@pytest.fixture
def processes(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    store, outbox = _world(database_url)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir", consents=())
    store.put("Consent", "social-permit", social_permit("active"), at=datetime(2026, 10, 28, 14, tzinfo=UTC))
    translated: list[str] = []
    prepare = deliver.prepare

    def counted(*args: Any, **kwargs: Any) -> Any:
        translated.append(kwargs["name"])
        return prepare(*args, **kwargs)

    monkeypatch.setattr(deliver, "prepare", counted)
    monkeypatch.setattr(deliver, "_CLAIMED", 2)  # a backlog longer than the cache of claimed letters
    clock, transport, maps = _Clock(), _Sending(), mappings()
    a = _process(database_url, clock, transport, maps)
    b = _process(database_url, clock, transport, maps)
    yield a, b, clock, transport, translated, outbox
    for each in (outbox, a[2], b[2]):
        each.reader.dispose()
        each.engine.dispose()


def _statuses(outbox: Outbox) -> list[str]:
    return sorted({d.status for d in outbox.deliveries()})


def test_the_accepting_process_translates_once_however_long_its_backlog(processes: tuple[Any, ...]) -> None:
    (a, intake_a, _), (b, _, _), clock, transport, translated, outbox = processes
    letters = [intake_a.accept(_letter(str(n)), "application/hl7-cda+xml", "test", NOW).letter_id for n in range(6)]
    clock.now = NOW + timedelta(seconds=4)
    assert a.run_once() == 12, "the first 4 letters (3 recipients each), claimed by letter"
    clock.now = NOW + timedelta(seconds=8)  # the accept's hold is over, but the holder renewed it at +4 s
    assert b.run_once() == 0, "the other process leaves the accepting one's deliveries alone"
    while a.run_once():
        pass
    assert translated == [], "every letter was delivered with the translation made when it was accepted"
    assert _statuses(outbox) == ["acknowledged"] and len(transport.sent) == 3 * len(letters)


def test_a_dead_holders_deliveries_are_taken_over_and_each_letter_translated_once(
    processes: tuple[Any, ...],
) -> None:
    (a, intake_a, _), (b, _, _), clock, transport, translated, outbox = processes
    letters = [intake_a.accept(_letter(str(n)), "application/hl7-cda+xml", "test", NOW).letter_id for n in range(6)]
    clock.now = NOW + timedelta(seconds=1)
    assert a.run_once() == 12  # renewed until +6 s; then the process is killed
    clock.now = NOW + timedelta(seconds=6) - timedelta(microseconds=1)
    assert b.run_once() == 0, "held until the last renewal's hold ends"
    clock.now = NOW + timedelta(seconds=6)
    while b.run_once():
        pass
    assert sorted(translated) == sorted(f"letter-{letter}" for letter in letters[4:])
    assert _statuses(outbox) == ["acknowledged"] and len(transport.sent) == 3 * len(letters)
    assert len(set(transport.ids)) == len(transport.ids), "no message sent twice"


def test_a_claim_cut_by_its_limit_takes_the_rest_of_the_letter(processes: tuple[Any, ...]) -> None:
    (_, intake_a, _), (b, _, _), clock, transport, translated, outbox = processes
    letters = [intake_a.accept(_letter(str(n)), "application/hl7-cda+xml", "test", NOW).letter_id for n in range(3)]
    clock.now = NOW + HOLD  # the accepting process never claimed them (killed): its hold is over
    assert b.run_once(limit=4) == 6, "two whole letters: the second's other deliveries follow its first"
    assert len(translated) == len(set(translated)) == 2, "each of them translated once"
    assert b.run_once(limit=4) == 3
    assert sorted(translated) == sorted(f"letter-{letter}" for letter in letters), "and the third once"
    assert _statuses(outbox) == ["acknowledged"] and len(set(transport.ids)) == 9


def test_a_live_holder_far_behind_is_helped_with_its_old_letters_only(
    processes: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, intake_a, _), (b, _, _), clock, _, translated, outbox = processes
    monkeypatch.setattr(deliver, "_FRESH_PER_BATCH", 1)  # a holder busy with one letter at a time

    def accept(tag: str, at: datetime) -> str:
        return intake_a.accept(_letter(tag), "application/hl7-cda+xml", "test", at).letter_id

    first, second, old = accept("1", NOW), accept("2", NOW), accept("3", NOW)
    clock.now = NOW + timedelta(seconds=4)
    assert a.run_once() == 3  # the first letter; the others (4 s old) held until +9 s
    recent = accept("4", NOW + timedelta(seconds=7))
    clock.now = NOW + timedelta(seconds=8)
    assert a.run_once() == 3  # the second; the third, 8 s old, is no longer renewed, the fourth is
    clock.now = NOW + timedelta(seconds=9) - timedelta(microseconds=1)
    assert b.run_once() == 0
    clock.now = NOW + timedelta(seconds=9)
    assert b.run_once() == 3 and translated == [f"letter-{old}"], "the idle process helps with the old one"
    assert b.run_once() == 0, "the recent one stays with its holder"
    assert a.run_once() == 0 and a.run_once() == 3, "the holder finds its old letter taken, delivers the recent"
    assert translated == [f"letter-{old}"]
    done = {d.letter_id for d in outbox.deliveries() if d.status == "acknowledged"}
    assert done == {first, second, old, recent}


def test_letters_accepted_here_and_claimed_when_due_are_not_translated_again(
    processes: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, intake_a, _), (b, _, _), clock, transport, translated, outbox = processes
    monkeypatch.setattr(deliver, "_FRESH_PER_BATCH", 1)  # its next letter by letter, the rest as they fall due
    letters = [
        intake_a.accept(_letter(str(n)), "application/hl7-cda+xml", "test", NOW + n * timedelta(seconds=0.1)).letter_id
        for n in range(3)
    ]
    clock.now = NOW + HOLD + timedelta(seconds=0.15)  # never renewed: the first two are due
    assert b.run_once(limit=3) == 3 and translated == [f"letter-{letters[0]}"], "another process took the first"
    clock.now += timedelta(seconds=0.15)
    assert a.run_once() == 6, "its first letter taken, the accepting process claims what is due: the other two"
    assert translated == [f"letter-{letters[0]}"], "with the translations it made when it accepted them"
    while a.run_once():
        pass
    assert _statuses(outbox) == ["acknowledged"] and len(set(transport.ids)) == len(transport.ids) == 9
