"""The store counts each type's writes, and the snapshots the API and the workers decide with are re-read
exactly when one of theirs was written — through any engine, as another gateway process would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

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
