"""Dispatch cost against translation alone, side by side in one run.

    python bench/bench_dispatch.py [--rounds 7] [--per-round 20]

Translation alone = ``gateway translate`` (ingest, translate, label, validate, serialise).  Dispatch =
the same plus, for each recipient, routing, consent decision, redaction, packaging, validation of what
the view changed, serialisation of its message, and the audit Bundle.  The bar: dispatching one letter
to 6 recipients costs at most 2x translating it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from gateway.consent import MemoryConsentStore  # noqa: E402
from gateway.directory import load_directory  # noqa: E402
from gateway.mappings import load_mappings  # noqa: E402
from gateway.pipeline import dispatch_letter, translate_letter  # noqa: E402
from gateway.policy import policy_from  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.translate.registry import SECTION_TRANSLATORS  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--letter", type=Path, default=FIXTURES / "ldl-ses-s1-pharmacy.xml")
    parser.add_argument("--directory", type=Path, default=FIXTURES / "directory.json")
    parser.add_argument("--consents", type=Path, default=FIXTURES / "consents-s1.json")
    parser.add_argument("--at", default="2026-10-30T12:00:00+01:00")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args()

    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    settings = Settings()
    policy = policy_from(mappings)
    directory = load_directory(orjson.loads(args.directory.read_bytes()), policy)
    store = MemoryConsentStore()
    store.load_bundle(orjson.loads(args.consents.read_bytes()))
    raw = args.letter.read_bytes()
    when = datetime.fromisoformat(args.at)

    def translate_once() -> None:
        translate_letter(raw, name=args.letter.name, mappings=mappings, settings=settings, now=when).json()

    def dispatch_once() -> int:
        result = dispatch_letter(
            raw,
            name=args.letter.name,
            mappings=mappings,
            settings=settings,
            directory=directory,
            consents=store,
            at=when,
        )
        for message in result.messages.values():
            orjson.dumps(message)
        orjson.dumps(result.audit)
        return len(result.decisions)

    recipients = dispatch_once()
    translate_once()
    translated: list[float] = []
    dispatched: list[float] = []
    for _ in range(args.rounds):
        for _ in range(args.per_round):
            start = time.perf_counter()
            translate_once()
            translated.append((time.perf_counter() - start) * 1000)
        for _ in range(args.per_round):
            start = time.perf_counter()
            dispatch_once()
            dispatched.append((time.perf_counter() - start) * 1000)
    t, d = statistics.median(translated), statistics.median(dispatched)
    print(f"letter: {args.letter.name}; recipients: {recipients}")
    print(f"translate alone: median {t:.2f} ms (n={len(translated)})")
    print(
        f"dispatch to {recipients} recipients: median {d:.2f} ms (n={len(dispatched)}), "
        f"{(d - t) / max(recipients, 1):.2f} ms per recipient beyond translation"
    )
    print(
        f"ratio dispatch/translate: {d / t:.2f} of medians (bar: <= 2.00); "
        f"{min(dispatched) / min(translated):.2f} of minimums"
    )
    return 0 if d / t <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
