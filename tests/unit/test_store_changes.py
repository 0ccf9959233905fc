"""The store counts each type's writes, and the snapshots the API and the workers decide with are re-read
exactly when one of theirs was written — through any engine, as another gateway process would."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.demo import social_permit
from gateway.policy import policy_from
from gateway.store import ResourceStore, StoreSnapshot
from tests.conftest import mappings

NOW = datetime(2026, 10, 28, 15, 0, tzinfo=UTC)
ORGANIZATION = {"resourceType": "Organization", "name": "SAAD"}


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[ResourceStore, ResourceStore]]:
    """Two stores on one database, each with its own engine: the gateway and "another process"."""
    first = ResourceStore(database_url)
    second = ResourceStore(database_url)
    yield first, second
    first.engine.dispose()
    second.engine.dispose()


def test_every_write_and_deletion_counts_once(stores: tuple[ResourceStore, ResourceStore]) -> None:
    store, _ = stores
    assert store.changes() == {}
    store.put("Organization", "saad", ORGANIZATION)
    store.put("Organization", "saad", {**ORGANIZATION, "name": "SAAD des Tilleuls"})
    store.put("Consent", "permit", social_permit(rid="permit"), at=NOW)
    assert store.changes() == {"Organization": 2, "Consent": 1}
    assert store.delete("Organization", "saad")
    assert not store.delete("Organization", "never-stored"), "nothing deleted, nothing counted"
    assert store.changes() == {"Organization": 3, "Consent": 1}


def test_a_snapshot_is_reread_exactly_when_its_kind_was_written(stores: tuple[ResourceStore, ResourceStore]) -> None:
    store, elsewhere = stores
    snapshot = StoreSnapshot(store, policy_from(mappings()))
    directory, consents = snapshot.current()
    assert snapshot.current() == (directory, consents) and snapshot.current()[0] is directory, "nothing written"
    elsewhere.put("Consent", "permit", social_permit(rid="permit"), at=NOW)
    after = snapshot.current()
    assert after[0] is directory, "a consent does not re-read the directory"
    assert after[1] is not consents and [v[0].id for v in after[1].versions()] == ["permit"]
    elsewhere.put("Organization", "saad", ORGANIZATION)
    assert snapshot.current()[0] is not directory and snapshot.current()[1] is after[1]
    elsewhere.delete("Consent", "permit")
    assert snapshot.current()[1] is not after[1], "a deletion is a change too"


PATIENTS = [("urn:oid:1.2.250.1.213.1.4.8", f"2{n:014d}") for n in range(4)]


def _content(snapshot: StoreSnapshot) -> tuple[list[tuple[str, str, datetime, Any]], list[Any], list[Any]]:
    """Everything a decision can read of the consents: all of them, and each patient's (the index)."""
    consents = snapshot.current()[1]
    flat = [(v.id, v.version, v.valid_from, v.resource) for g in consents.versions() for v in g]
    by_patient = [consents.about({patient}) for patient in PATIENTS] + [consents.about(set(PATIENTS[:2]))]
    return flat, list(consents.related), by_patient


@pytest.mark.parametrize("seed", range(3))
def test_what_is_read_since_equals_a_whole_reread(stores: tuple[ResourceStore, ResourceStore], seed: int) -> None:
    """Consents and guardians created, changed and deleted through another engine, in random order: after
    each step the snapshot read incrementally holds exactly what reading everything again gives."""
    store, elsewhere = stores
    policy = policy_from(mappings())
    kept = StoreSnapshot(store, policy)
    rng = random.Random(seed)
    assert _content(kept) == ([], [], [([], [])] * 5)
    earlier = kept.current()[1]
    seen = [earlier.about({patient}) for patient in PATIENTS]
    for step in range(60):
        rid = f"r{rng.randrange(8)}"
        system, value = rng.choice(PATIENTS)
        patient = {"identifier": {"system": system, "value": value}}
        move = rng.random()
        if move < 0.45:
            body = {**social_permit(rid=rid), "patient": patient, "status": rng.choice(["active", "inactive"])}
            elsewhere.put("Consent", rid, body, at=NOW + timedelta(minutes=step))
        elif move < 0.6:
            elsewhere.delete("Consent", rid, at=NOW + timedelta(minutes=step))
        elif move < 0.85:
            guardian = {"resourceType": "RelatedPerson", "patient": patient, "period": {"start": f"20{10 + step % 10}"}}
            elsewhere.put("RelatedPerson", rid, guardian)
        else:
            elsewhere.delete("RelatedPerson", rid)
        if rng.random() < 0.5:  # sometimes several writes between two reads
            assert _content(kept) == _content(StoreSnapshot(store, policy)), f"step {step}"
            # a thread may still be deciding with the snapshot before: the new one must leave it as it was
            assert [earlier.about({patient}) for patient in PATIENTS] == seen, f"step {step}: an old snapshot changed"
            earlier = kept.current()[1]
            seen = [earlier.about({patient}) for patient in PATIENTS]
    assert _content(kept) == _content(StoreSnapshot(store, policy))
    assert _content(kept)[0], "the walk left consents to compare"


def test_a_consent_change_reads_only_what_was_written(stores: tuple[ResourceStore, ResourceStore]) -> None:
    store, elsewhere = stores
    for n in range(30):
        patient = {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": f"2{n:014d}"}}
        elsewhere.put("Consent", f"c{n}", {**social_permit(rid=f"c{n}"), "patient": patient}, at=NOW)
    kept = StoreSnapshot(store, policy_from(mappings()))
    kept.current()
    read: list[str] = []
    whole, some = store.all_versions, store.versions_of
    store.all_versions = lambda t: read.append(f"all {t}") or whole(t)  # type: ignore[method-assign]
    store.versions_of = lambda t, ids: read.append(f"{t} {sorted(ids)}") or some(t, ids)  # type: ignore[method-assign]
    elsewhere.put("Consent", "c7", {**social_permit(rid="c7"), "status": "inactive"}, at=NOW + timedelta(days=1))
    after = kept.current()[1]
    assert read == ["Consent ['c7']"]
    assert [g[-1].resource["status"] for g in after.versions() if g[0].id == "c7"] == ["inactive"]


def test_writers_of_several_types_take_the_counters_in_one_order(postgresql_url: str) -> None:
    """PostgreSQL: an import writing RelatedPerson then Consent, beside one writing Consent, must not hold
    RelatedPerson while it waits for Consent (two such imports would deadlock): it takes Consent first."""
    store = ResourceStore(postgresql_url)
    try:
        with store.engine.connect() as first, store.engine.connect() as third:
            first.begin()
            store.put_in(first, "Consent", "c1", social_permit(rid="c1"), NOW)  # holds Consent's counter
            started = threading.Event()

            def import_both() -> None:
                with store.engine.begin() as second:
                    started.set()
                    store.hold(second, ["RelatedPerson", "Consent"])  # waits for Consent, holding nothing

            waiting = threading.Thread(target=import_both)
            waiting.start()
            started.wait(5)
            time.sleep(0.3)  # the import is now blocked on a counter
            third.begin()
            third.exec_driver_sql("SET LOCAL lock_timeout = '3s'")
            store.hold(third, ["RelatedPerson"])  # free: the blocked import took nothing before Consent
            third.rollback()
            assert waiting.is_alive(), "the import waits for the first writer"
            first.commit()
            waiting.join(10)
            assert not waiting.is_alive()
    finally:
        store.engine.dispose()
