"""CPU per message of the reference receiver (``gateway receiver``): its ASGI app, driven in-process.

    python bench/bench_receiver.py [--messages 300] [--profile]
    python bench/bench_receiver.py --compare /path/to/other/checkout [--turns 8]

The S6 letter is translated, routed and cut as in ``bench_cut.py``; each recipient's message is given
fresh ``Bundle.id`` / ``MessageHeader.id`` values and sealed, a few hundred of them, and POSTed one by
one to ``create_receiver``'s app (called as ASGI, no socket, no HTTP parsing) on a SQLite file DB with a
trusted key: body read, JSON, seal check, INSERT + commit (waiting for the fsync is not CPU), response.  The
figure is this thread's CPU time per request (``time.thread_time``: the machine may be busy), median
over the messages; garbage collection is off as in a serving process (``supervise.settle_heap``).
A resend of each message is timed too (the primary key refuses it, the stored answer is returned).

``--code DIR`` imports ``gateway`` from another checkout (this file need not exist there).
``--compare DIR`` makes the messages once, with this checkout (both sides receive the same bytes), then
runs this file on DIR's code and on this checkout's in alternating processes, so a noisy machine drifts
on both sides alike, and prints the medians of the per-run medians.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
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
AT = datetime.fromisoformat("2026-11-05T11:30:00+01:00")


def _messages(count: int) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """``count`` sealed messages (path, body) cut from the S6 letter, and the public key (JWK) to trust."""
    from gateway import seal
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
    raw = (FIXTURES / "ldl-ses-s6-objection.xml").read_bytes()
    prepared = prepare(raw, name="s6.xml", mappings=mappings, settings=settings, now=AT)
    directory = load_directory(orjson.loads((FIXTURES / "directory.json").read_bytes()), prepared.policy)
    store = MemoryConsentStore()
    consent = social_permit(rid="bench-permit")
    consent["meta"] = {"lastUpdated": "2026-10-28T15:00:00+01:00"}
    store.add(consent)
    signer = seal.Signer(seal.generate_key())
    templates: list[tuple[str, bytes]] = []
    for item in route(prepared.resources, directory, prepared.policy).routed:
        cut = cut_for(prepared, item, AT, store, settings)
        if cut.message is not None:
            templates.append((item.recipient.id, orjson.dumps(cut.message)))
    stamp = AT.isoformat(timespec="seconds")
    out = []
    for n in range(count):
        rid, template = templates[n % len(templates)]
        message = orjson.loads(template)
        message["id"] = f"bench-bundle-{n:06d}"
        message["entry"][0]["resource"]["id"] = f"bench-header-{n:06d}"
        out.append((f"/fhir/{rid}/$process-message", orjson.dumps(seal.sign(message, signer, stamp))))
    return out, dict(signer.key.as_dict(private=False))


_HEADERS = [(b"content-type", b"application/fhir+json")]


async def _post(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    return await asgi_post(app, path, body, _HEADERS, scheme="https", port=8443)


def measure(messages: list[tuple[str, bytes]], jwk: dict[str, Any], profile: bool) -> dict[str, float]:
    from joserfc.jwk import ECKey

    from gateway.receiver import create_receiver

    key = ECKey.import_key(jwk)
    key.ensure_kid()
    sizes = sorted(len(body) for _, body in messages)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_receiver(f"sqlite:///{tmp}/rx.db", [key], endpoint="https://127.0.0.1:8443/fhir")

        async def run() -> dict[str, list[float]]:
            for path, body in messages[:3]:  # warm up: middleware stack, statement caches; not timed again
                assert (await _post(app, path, body))[0] == 200
            gc.collect()
            gc.freeze()
            gc.disable()  # as a serving process (supervise.settle_heap)
            profiler = cProfile.Profile(time.thread_time) if profile else None
            times: dict[str, list[float]] = {"message": [], "resend": []}
            times.update({path: [] for path, _ in messages})
            try:
                for name, batch in (("message", messages[3:]), ("resend", messages[3:])):
                    for path, body in batch:
                        if profiler and name == "message":
                            profiler.enable()
                        start = time.thread_time()
                        status, _ = await _post(app, path, body)
                        times[name].append((time.thread_time() - start) * 1000)
                        if name == "message":
                            times[path].append(times[name][-1])
                        if profiler and name == "message":
                            profiler.disable()
                        assert status == 200, status
            finally:
                gc.enable()
                gc.unfreeze()
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(45)
            return times

        times = asyncio.run(run())
    return {
        "message_ms": statistics.median(times["message"]),
        "message_mean_ms": statistics.fmean(times["message"]),
        "resend_ms": statistics.median(times["resend"]),
        "body_kb": sizes[len(sizes) // 2] / 1024,
        **{  # by recipient: the GP's message carries the original letter (~115 kB), the others ~25 kB
            f"{path.split('/')[2]}_ms": statistics.median(values)
            for path, values in times.items()
            if path.startswith("/")
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose gateway package is measured")
    parser.add_argument("--load", type=Path, help="messages and key written by --compare (both sides get the same)")
    parser.add_argument("--compare", type=Path, help="another checkout to compare with, interleaved")
    parser.add_argument("--turns", type=int, default=8)
    args = parser.parse_args()
    if args.compare is None:
        use_code(args.code)
        if args.load is not None:
            saved = orjson.loads(args.load.read_bytes())
            messages, jwk = [(path, body.encode()) for path, body in saved["messages"]], saved["key"]
        else:
            messages, jwk = _messages(args.messages)
        result = measure(messages, jwk, args.profile)
        if args.json:
            print(orjson.dumps(result).decode())
        else:
            for name, value in result.items():
                print(f"{name}: {value:.3f}")
        return 0
    sys.path.insert(0, str(ROOT))
    messages, jwk = _messages(args.messages)  # made once by this checkout: the same bytes on both sides
    with tempfile.NamedTemporaryFile(suffix=".json") as saved:
        saved.write(orjson.dumps({"key": jwk, "messages": [(path, body.decode()) for path, body in messages]}))
        saved.flush()
        report(*interleaved(__file__, args.compare, args.turns, ["--load", saved.name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
