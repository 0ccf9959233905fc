"""The per-recipient cost at send time: ``cut_for`` (consent, redact, package, validate, audit) + the sealed
bytes the transport sends (``seal.sign_bytes``, as ``Deliverer`` does).

    python bench/bench_cut.py [--rounds 200] [--profile]
    python bench/bench_cut.py --compare /path/to/other/checkout [--turns 6]

The letter is translated once (as the service does) and cut for each routed recipient, as in the load
benchmark: the S6 letter, its GP, and the social recipients (CLIC, SAAD) allowed logistics + social data
by a permit for the outside-care-team.  The last lines compare, on the same three messages, sealing as
the worker does (``seal.sign_bytes``: the signed canonical JSON is sent as it is) with signing and then
serialising the signed Bundle again (``orjson.dumps(seal.sign(...))``, the worker until 2026-11-24).
``--compare`` runs this file against another checkout and this
one in alternating processes, so a noisy machine drifts on both sides alike, and prints both medians.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from gateway import seal  # noqa: E402
from gateway.consent import MemoryConsentStore  # noqa: E402
from gateway.demo import social_permit  # noqa: E402
from gateway.directory import load_directory  # noqa: E402
from gateway.mappings import load_mappings  # noqa: E402
from gateway.pipeline import cut_for, prepare  # noqa: E402
from gateway.route import route  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.translate.registry import SECTION_TRANSLATORS  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dispatch"
AT = datetime.fromisoformat("2026-11-05T11:30:00+01:00")


def measure(rounds: int, profile: bool, fresh: bool) -> dict[str, float]:
    """Median CPU ms (this thread's: the machine may be busy) per recipient of cut_for + sign.

    ``fresh``: a newly prepared letter each round, as in the service (nothing memoised yet).
    """
    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    settings = Settings()
    raw = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()
    prepared = prepare(raw, name="s6.xml", mappings=mappings, settings=settings, now=AT)
    directory = load_directory(orjson.loads((FIXTURES / "directory.json").read_bytes()), prepared.policy)
    store = MemoryConsentStore()
    consent = social_permit(rid="bench-permit")
    consent["meta"] = {"lastUpdated": "2026-10-28T15:00:00+01:00"}
    store.add(consent)
    signer = seal.Signer(seal.generate_key())
    routed = route(prepared.resources, directory, prepared.policy).routed
    stamp = AT.isoformat(timespec="seconds")
    times: dict[str, list[float]] = {r.recipient.id: [] for r in routed}
    profiler = cProfile.Profile() if profile else None
    for _ in range(rounds):
        letter = prepare(raw, name="s6.xml", mappings=mappings, settings=settings, now=AT) if fresh else prepared
        for item in routed:
            if profiler:
                profiler.enable()
            start = time.thread_time()
            cut = cut_for(letter, item, AT, store, settings)
            if cut.message is not None:
                seal.sign_bytes(cut.message, signer, stamp)
            times[item.recipient.id].append((time.thread_time() - start) * 1000)
            if profiler:
                profiler.disable()
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    medians = {k: statistics.median(v) for k, v in times.items()}
    medians["total"] = sum(medians.values())
    messages = [m for m in (cut_for(prepared, r, AT, store, settings).message for r in routed) if m is not None]
    ways: dict[str, Callable[[], object]] = {
        "seal 3 messages, sign_bytes": lambda: [seal.sign_bytes(m, signer, stamp) for m in messages],
        "seal 3 messages, dumps(sign)": lambda: [orjson.dumps(seal.sign(m, signer, stamp)) for m in messages],
    }
    sealed: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():  # alternating: the machine's drift weighs on both
            start = time.thread_time()
            way()
            sealed[name].append((time.thread_time() - start) * 1000)
    medians.update({name: statistics.median(v) for name, v in sealed.items()})
    return medians


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="a newly prepared letter per round (cold memos)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compare", type=Path, help="another checkout to compare with, interleaved")
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    if args.compare is None:
        medians = measure(args.rounds, args.profile, args.fresh)
        if args.json:
            print(orjson.dumps(medians).decode())
        else:
            for name, value in medians.items():
                print(f"{name}: {value:.3f} ms")
        return 0
    sides = {"other": args.compare / "bench" / "bench_cut.py", "this": Path(__file__)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    extra = ["--fresh"] if args.fresh else []
    for _ in range(args.turns):
        for name, script in sides.items():
            out = subprocess.run(
                [sys.executable, str(script), "--rounds", str(args.rounds), "--json", *extra],
                check=True,
                capture_output=True,
                cwd=script.parent.parent,
            ).stdout
            results[name].append(orjson.loads(out.splitlines()[-1]))
    for name, runs in results.items():
        keys = runs[0].keys()
        print(name, {k: round(statistics.median(r[k] for r in runs), 3) for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
