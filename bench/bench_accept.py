"""CPU per ``POST /letters`` of the gateway's ASGI app, driven in-process, split into the letter's own work
(``Intake.accept``: translate, route, the durable commit) and everything around it (middleware, routing,
authentication, dependencies, the thread hand-off, the answer, the request log line).

    python bench/bench_accept.py [--letters 120] [--profile]
    python bench/bench_accept.py --compare /path/to/other/checkout [--turns 8]

The S6 letter (``tests/fixtures/dispatch/ldl-ses-s6-objection.xml``) with a fresh document id per request
(as ``bench_load.py``) is POSTed to ``create_app``'s app — wrapped in uvicorn's proxy-headers middleware as
``gateway serve`` runs it, called as ASGI (no socket, no HTTP parsing) — over a SQLite file holding the
sample directory and a social permit, with JSON log lines (to /dev/null) as in ``gateway serve``.  Per
request: "total" is the process's CPU time (``time.process_time``: the letter is accepted on a worker
thread) and "inside" the worker thread's CPU time in ``Intake.accept``; "outside" is their difference.
Medians over the letters; garbage collection is off as in a serving process.  ``--profile`` profiles the
event loop's thread (what runs around the hand-off to ``Intake.accept``'s thread).

``--code DIR`` imports ``gateway`` from another checkout (this file need not exist there).
``--compare DIR`` runs this file on DIR's code and on this checkout's in alternating processes, so a
noisy machine drifts on both sides alike, and prints the medians of the per-run medians and the per-turn
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from _paired import asgi_post, interleaved, report, use_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"
HIS = "his-key-bench-0123456789abcdef"
BASE = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()


def _letter(tag: str) -> bytes:
    """The S6 letter with its own document id (``bench_load.py``): each request is a new letter."""
    start = BASE.index(b"<id ", BASE.index(b"<ClinicalDocument"))
    end = BASE.index(b"/>", start) + 2
    return BASE[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="BENCH-{tag}"/>'.encode() + BASE[end:]


_HEADERS = [(b"authorization", f"Bearer {HIS}".encode()), (b"content-type", b"application/hl7-cda+xml")]


async def _post(app: Any, body: bytes) -> tuple[int, bytes]:
    return await asgi_post(app, "/letters", body, _HEADERS)


def measure(letters: int, profile: bool) -> dict[str, float]:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from gateway import intake, logs
    from gateway.api.app import create_app
    from gateway.demo import seed_store, social_permit
    from gateway.mappings import load_mappings
    from gateway.outbox import Outbox
    from gateway.seal import Signer, generate_key
    from gateway.settings import Settings
    from gateway.store import ResourceStore, make_engine
    from gateway.translate.registry import SECTION_TRANSLATORS

    inside: list[float] = []
    accept = intake.Intake.accept

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return accept(self, *args, **kwargs)
        finally:
            inside.append(time.thread_time() - start)

    intake.Intake.accept = timed  # type: ignore[method-assign]
    with open(os.devnull, "w") as devnull, tempfile.TemporaryDirectory() as tmp:
        logs.configure("json", "INFO", stream=devnull)  # the request line is formatted, as in gateway serve
        engine = make_engine(f"sqlite:///{tmp}/gateway.db")
        store = ResourceStore(engine=engine)
        seed_store(store, lambda ep: f"http://127.0.0.1:9/fhir/{ep}", consents=())
        store.put(
            "Consent",
            "bench-permit",
            social_permit(rid="bench-permit"),
            at=datetime.fromisoformat("2026-10-28T15:00:00+01:00"),
        )
        outbox = Outbox(engine, Signer(generate_key()))
        settings = Settings(api_keys={HIS: frozenset({"his"})})
        mappings = load_mappings(translators=SECTION_TRANSLATORS)
        app = ProxyHeadersMiddleware(create_app(settings, store, outbox, mappings), trusted_hosts="127.0.0.1")

        async def run() -> tuple[list[float], list[float]]:
            for n in range(3):  # warm up: middleware stack, statement caches, the thread pool; not timed
                assert (await _post(app, _letter(f"warm-{n}")))[0] == 202
            bodies = [_letter(f"{os.getpid()}-{n}") for n in range(letters)]
            inside.clear()
            gc.collect()
            gc.freeze()
            gc.disable()  # as a serving process (supervise.settle_heap)
            profiler = cProfile.Profile(time.thread_time) if profile else None  # the event loop's thread
            totals: list[float] = []
            try:
                for body in bodies:
                    if profiler:
                        profiler.enable()
                    start = time.process_time()
                    status, answer = await _post(app, body)
                    totals.append(time.process_time() - start)
                    if profiler:
                        profiler.disable()
                    assert status == 202, (status, answer[:300])
            finally:
                gc.enable()
                gc.unfreeze()
            if profiler:
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
            return totals, list(inside)

        totals, insides = asyncio.run(run())
        engine.dispose()
    outside = [(t - i) * 1000 for t, i in zip(totals, insides, strict=True)]
    return {
        "total_ms": statistics.median(totals) * 1000,
        "inside_ms": statistics.median(insides) * 1000,
        "outside_ms": statistics.median(outside),
        "outside_mean_ms": statistics.fmean(outside),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--letters", type=int, default=120)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose gateway package is measured")
    parser.add_argument("--compare", type=Path, help="another checkout to compare with, interleaved")
    parser.add_argument("--turns", type=int, default=8)
    args = parser.parse_args()
    if args.compare is None:
        use_code(args.code)
        result = measure(args.letters, args.profile)
        if args.json:
            print(orjson.dumps(result).decode())
        else:
            for name, value in result.items():
                print(f"{name}: {value:.3f}")
        return 0
    report(*interleaved(__file__, args.compare, args.turns, ["--letters", str(args.letters)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
