"""CPU per letter of ``pipeline.prepare`` (ingest → translate → label → validate) and of the S6 letter's cuts.

    python bench/bench_prepare.py [--rounds 40] [--profile]
    python bench/bench_prepare.py --compare /path/to/other/checkout [--turns 6]

Each dispatch scenario letter (``tests/fixtures/dispatch/*.xml``) and the C-CDA sample are prepared
``--rounds`` times; the S6 letter is then cut (``pipeline.cut_for``: consent, redact, package,
validate, audit; no seal) for its three routed recipients, a freshly prepared letter each round as in
the service (nothing memoised yet).  The figure is this thread's CPU time (``time.thread_time``: the
machine may be busy), median per letter; garbage collection is off as in a serving process
(``supervise.settle_heap``), so a collection's pause is not charged to whichever line triggered it.

``--code DIR`` imports ``gateway`` from another checkout (this file need not exist there).
``--compare DIR`` runs this file on DIR's code and on this checkout's in alternating processes (each
side first every other turn), so a noisy machine drifts on both sides alike, and prints the medians of
the per-run medians and the medians of the per-turn ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
from _paired import interleaved, report, use_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "tests" / "fixtures"
LETTERS = [*sorted((FIXTURES / "dispatch").glob("*.xml")), FIXTURES / "ccda" / "Discharge_Summary.ccda"]
S6 = FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml"
AT = datetime.fromisoformat("2026-11-05T11:30:00+01:00")


def measure(rounds: int, profile: bool) -> dict[str, float]:
    """Median CPU ms of prepare() per letter, of the S6 letter's three cuts, and of both for S6."""
    from gateway.consent import MemoryConsentStore
    from gateway.demo import social_permit
    from gateway.directory import load_directory
    from gateway.mappings import load_mappings
    from gateway.pipeline import cut_for, prepare
    from gateway.route import route
    from gateway.settings import Settings
    from gateway.translate.registry import SECTION_TRANSLATORS

    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    settings = Settings()
    gc.collect()
    gc.freeze()
    gc.disable()  # as a serving process (supervise.settle_heap); the letter path makes no cycles
    profiler = cProfile.Profile() if profile else None
    out: dict[str, float] = {}
    for path in LETTERS:
        raw = path.read_bytes()
        prepare(raw, name=path.name, mappings=mappings, settings=settings, now=AT)  # warm-up (first-use caches)
        times: list[float] = []
        for _ in range(rounds):
            if profiler:
                profiler.enable()
            start = time.thread_time()
            prepare(raw, name=path.name, mappings=mappings, settings=settings, now=AT)
            times.append((time.thread_time() - start) * 1000)
            if profiler:
                profiler.disable()
        out[f"prepare {path.stem}"] = statistics.median(times)

    raw = S6.read_bytes()
    prepared = prepare(raw, name=S6.name, mappings=mappings, settings=settings, now=AT)
    directory = load_directory(orjson.loads((FIXTURES / "dispatch" / "directory.json").read_bytes()), prepared.policy)
    store = MemoryConsentStore()
    consent = social_permit(rid="bench-permit")
    consent["meta"] = {"lastUpdated": "2026-10-28T15:00:00+01:00"}
    store.add(consent)
    routed = route(prepared.resources, directory, prepared.policy).routed
    assert len(routed) == 3, [r.recipient.id for r in routed]
    for item in routed:  # warm-up
        cut_for(prepared, item, AT, store, settings)
    cuts: list[float] = []
    for _ in range(rounds * 2):
        letter = prepare(raw, name=S6.name, mappings=mappings, settings=settings, now=AT)
        if profiler:
            profiler.enable()
        start = time.thread_time()
        for item in routed:
            cut_for(letter, item, AT, store, settings)
        cuts.append((time.thread_time() - start) * 1000)
        if profiler:
            profiler.disable()
    out["3 cuts s6"] = statistics.median(cuts)
    out["prepare+3 cuts s6"] = out[f"prepare {S6.stem}"] + out["3 cuts s6"]
    out["prepare all letters"] = sum(v for k, v in out.items() if k.startswith("prepare "))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose gateway package is measured")
    parser.add_argument("--compare", type=Path, help="another checkout to compare with, interleaved")
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    if args.compare is None:
        use_code(args.code)
        result = measure(args.rounds, args.profile)
        if args.json:
            print(orjson.dumps(result).decode())
        else:
            for name, value in result.items():
                print(f"{name}: {value:.3f} ms")
        return 0
    report(*interleaved(__file__, args.compare, args.turns, ["--rounds", str(args.rounds)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
