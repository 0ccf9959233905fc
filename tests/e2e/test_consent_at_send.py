"""The consent decision is taken at send time, with the consents stored then — even though the
worker keeps the directory and consents in memory between batches (``StoreSnapshot``).

S6 letter, 3 recipients (GP, and two social actors the patient's consent lets receive logistics and
social data).  A first letter reaches all three; the patient then withdraws the consent; a second
letter, accepted before the withdrawal but delivered after it, reaches the GP only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from gateway.deliver import Deliverer
from gateway.demo import seed_store, social_permit
from gateway.intake import Intake
from gateway.mappings import load_mappings
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES
from tests.fuzz.world import Recording

LETTER = (FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml").read_bytes()


def _letter(tag: str) -> bytes:
    start = LETTER.index(b"<id ", LETTER.index(b"<ClinicalDocument"))
    end = LETTER.index(b"/>", start) + 2
    return LETTER[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="AT-SEND-{tag}"/>'.encode() + LETTER[end:]


def test_a_withdrawal_stored_after_acceptance_applies_to_the_next_batch(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir", consents=())
    store.put("Consent", "social-permit", social_permit("active"), at=datetime(2026, 10, 28, 14, tzinfo=UTC))
    settings, mappings, transport = Settings(), load_mappings(), Recording()
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings,
        settings=settings,
        signer=Signer(generate_key()),
        transports={"https": transport},
    )
    intake = Intake(settings, store, outbox, mappings, on_accepted=worker.remember)
    try:
        first = intake.accept(_letter("1"), "application/hl7-cda+xml", "test", datetime.now(UTC)).letter_id
        while worker.run_once():
            pass
        second = intake.accept(_letter("2"), "application/hl7-cda+xml", "test", datetime.now(UTC)).letter_id
        store.put("Consent", "social-permit", social_permit("inactive"))  # withdrawn, after the acceptance
        while worker.run_once():
            pass
        states: dict[str, dict[str, str]] = {}
        for d in outbox.deliveries():
            states.setdefault(d.letter_id, {})[d.recipient_id] = d.status
        assert sorted(states[first].values()) == ["acknowledged"] * 3, states[first]
        assert sorted(states[second].values()) == ["acknowledged", "withheld", "withheld"], states[second]
        gp = next(r for r, s in states[second].items() if s == "acknowledged")
        assert states[first][gp] == "acknowledged"
        assert len(transport.sent) == 4, "nothing went to the social actors once the consent was withdrawn"
    finally:
        outbox.reader.dispose()
        engine.dispose()
