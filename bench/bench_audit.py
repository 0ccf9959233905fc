"""What the tamper-evident audit costs, and how fast it is checked.

    python bench/bench_audit.py [--letters 150] [--records 200000]

1. **Cost per letter** (bar: audit adds at most 20 %): the service's whole path for a letter, in one
   process on a SQLite file — ``POST /letters``' work (translate, route, store the letter, its
   deliveries and its audit in one transaction), then the worker's (claim, consent, redact, package,
   seal, record the outcome) with a transport that answers at once — measured with the audit as
   built (AuditEvents built, chained, checkpoints signed) and with the audit switched off (no event
   built, nothing appended).  Rounds alternate, medians compared.
2. **verify speed** (bar: ≥ 100,000 records/s): a log of ``--records`` real AuditEvents (the
   letters' own, repeated under new ids) chained as the gateway chains them, then walked by
   ``verify`` with its checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from gateway import audit, pipeline  # noqa: E402
from gateway.api.app import create_app  # noqa: E402
from gateway.auditlog import AuditLog, verify  # noqa: E402
from gateway.deliver import Deliverer  # noqa: E402
from gateway.mappings import load_mappings  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.seal import Signer, generate_key  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.store import ResourceStore, make_engine  # noqa: E402
from gateway.translate.registry import SECTION_TRANSLATORS  # noqa: E402
from gateway.transports import Outcome  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"
BASE = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()
HIS = "his-key-bench-audit-0123456789"


class Answered:
    """A recipient that acknowledges at once (the network is not what is measured here)."""

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        return Outcome("ok", "200 ok")

    def close(self) -> None:
        pass


def _letter(tag: str) -> bytes:
    start = BASE.index(b"<id ", BASE.index(b"<ClinicalDocument"))
    end = BASE.index(b"/>", start) + 2
    return BASE[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="BENCH-{tag}"/>'.encode() + BASE[end:]


class _Rig:
    def __init__(self, tmp: Path, name: str) -> None:
        mappings = load_mappings(translators=SECTION_TRANSLATORS)
        self.engine = make_engine(f"sqlite:///{tmp / name}.db")
        store = ResourceStore(engine=self.engine)
        signer = Signer(generate_key())
        self.outbox = Outbox(self.engine, signer)
        for entry in orjson.loads((FIXTURES / "directory.json").read_bytes())["entry"]:
            res = entry["resource"]
            if res["resourceType"] == "Endpoint":
                res = {
                    **res,
                    "address": "http://127.0.0.1:9/fhir",
                    "connectionType": {**res["connectionType"], "code": "hl7-fhir-msg"},
                }
            store.put(res["resourceType"], res["id"], res)
        for entry in orjson.loads((FIXTURES / "consents-s6.json").read_bytes())["entry"]:
            res = entry["resource"]
            store.put("Consent", res["id"], res, at=datetime.fromisoformat(res["meta"]["lastUpdated"]))
        settings = Settings(api_keys={HIS: frozenset({"his"})})
        self.worker = Deliverer(
            outbox=self.outbox, store=store, mappings=mappings, settings=settings, signer=signer,
            transports={"http": Answered()},  # type: ignore[dict-item]
        )  # fmt: skip
        self.client = TestClient(create_app(settings, store, self.outbox, mappings, on_accepted=self.worker.remember))

    def letter(self, tag: str) -> None:
        answer = self.client.post(
            "/letters",
            content=_letter(tag),
            headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/xml"},
        )
        assert answer.status_code == 202, answer.text
        while self.worker.run_once():
            pass


def _no_audit() -> Any:
    """Switch the audit off: no AuditEvent built, nothing chained or stored."""
    stub = {"id": "x", "outcomeDesc": ""}
    return [
        mock.patch.object(AuditLog, "append_many", lambda self, conn, items, now: None),
        mock.patch.object(pipeline.audit, "disclosure_event", lambda *a, **k: dict(stub)),
        mock.patch.object(audit, "route_event", lambda *a, **k: dict(stub)),
    ]


def cost(letters: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        on, off = _Rig(Path(tmp), "on"), _Rig(Path(tmp), "off")
        for n in range(5):  # warm both
            on.letter(f"warm-on-{n}")
            off.letter(f"warm-off-{n}")
        with_audit: list[float] = []
        without: list[float] = []
        per_round = max(1, letters // rounds)
        for r in range(rounds):
            start = time.perf_counter()
            for n in range(per_round):
                on.letter(f"on-{r}-{n}")
            with_audit.append((time.perf_counter() - start) / per_round * 1000)
            patches = _no_audit()
            for p in patches:
                p.start()
            try:
                start = time.perf_counter()
                for n in range(per_round):
                    off.letter(f"off-{r}-{n}")
                without.append((time.perf_counter() - start) / per_round * 1000)
            finally:
                for p in patches:
                    p.stop()
        records = len(on.outbox.audit_events())
        a, b = statistics.median(with_audit), statistics.median(without)
        print(
            f"letter cost (S6, 3 recipients, accept + deliver, SQLite): with audit {a:.2f} ms, without {b:.2f} ms "
            f"→ audit adds {100 * (a - b) / b:.1f} % (bar: ≤ 20 %); {records} records chained"
        )
        for rig in (on, off):
            rig.client.close()
            rig.engine.dispose()


def speed(records: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rig = _Rig(Path(tmp), "source")
        for n in range(3):
            rig.letter(f"src-{n}")
        samples: Sequence[dict[str, Any]] = rig.outbox.audit_events()
        rig.client.close()
        engine = make_engine(f"sqlite:///{Path(tmp) / 'big.db'}")
        signer = Signer(generate_key())
        log = Outbox(engine, signer).log
        now = datetime(2026, 11, 2, tzinfo=UTC)
        written = 0
        while written < records:
            batch = [({**samples[i % len(samples)], "id": f"bench-{written + i}"}, f"letter-{(written + i) // 4}", None)
                     for i in range(min(1000, records - written))]  # fmt: skip
            with engine.begin() as conn:
                log.append_many(conn, batch, now + timedelta(seconds=written))
            written += len(batch)
        size = sum(len(orjson.dumps(s)) for s in samples) / len(samples)
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            report = verify(engine, [signer.key])
            elapsed = time.perf_counter() - start
            assert report.ok and report.records == records, report.problems[:3]
            best = max(best, records / elapsed)
        print(
            f"verify: {records} records (mean AuditEvent {size / 1024:.1f} KiB, {report.checkpoints} checkpoints) "
            f"→ best of 3: {best:,.0f} records/s (bar: ≥ 100,000/s)"
        )
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--letters", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    cost(args.letters, args.rounds)
    speed(args.records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
