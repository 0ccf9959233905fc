"""An in-process gateway for the fuzz, schemathesis and hostile-input tests.

The real app (``create_app`` with a SQLite store, the outbox and the mappings), the S1 directory and
consents loaded, API keys for every role, and a delivery worker whose transports only record what
they were given (nothing leaves the process).  ``rows()`` counts what is stored, so a test can check
that a refusal stored nothing but its audit record.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from gateway.api.app import create_app
from gateway.deliver import Deliverer, RetryPolicy
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from gateway.transports import Outcome
from tests.conftest import FIXTURES, mappings

ADMIN = "admin-key-0123456789abcdef"
AUDITOR = "auditor-key-0123456789abcdef"
HIS = "his-key-0123456789abcdef0000"
DISPATCH = FIXTURES / "dispatch"
KEYS = {ADMIN: frozenset({"admin"}), AUDITOR: frozenset({"auditor"}), HIS: frozenset({"his"})}


def auth(key: str = HIS) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Recording:
    """A transport that acknowledges everything and keeps the payloads it was given."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        self.sent.append((endpoint, payload))
        return Outcome("ok", "recorded")

    def close(self) -> None:
        return None


@dataclass
class World:
    app: FastAPI
    client: TestClient
    store: ResourceStore
    outbox: Outbox
    worker: Deliverer
    transport: Recording
    settings: Settings

    def rows(self) -> dict[str, int]:
        """How many letters, deliveries and audit records are stored."""
        with self.store.engine.connect() as conn:
            return {
                table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in ("letter", "delivery", "audit_event")
            }

    def push(self, body: bytes, content_type: str = "application/hl7-cda+xml", key: str = HIS) -> Any:
        return self.client.post("/letters", content=body, headers={**auth(key), "Content-Type": content_type})

    def deliver_all(self) -> int:
        done = 0
        while attempted := self.worker.run_once(limit=50):
            done += attempted
        return done


def load_s1(store: ResourceStore) -> None:
    """The dispatch directory (every endpoint made https) and the S1 consents."""
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")


@contextmanager
def world(directory: Path, *, max_bytes: int | None = None) -> Iterator[World]:
    engine = make_engine(f"sqlite:///{directory / 'gateway.db'}")
    store = ResourceStore(engine=engine)
    outbox = Outbox(engine)
    load_s1(store)
    settings = Settings(api_keys=KEYS) if max_bytes is None else Settings(api_keys=KEYS, max_document_bytes=max_bytes)
    transport = Recording()
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=Signer(generate_key()),
        transports={"https": transport},
        retry=RetryPolicy(max_attempts=2, initial=60.0),
    )
    app = create_app(settings, store, outbox, mappings(), on_accepted=worker.remember)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield World(app, client, store, outbox, worker, transport, settings)
    finally:
        worker.close()
        engine.dispose()
