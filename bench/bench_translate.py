"""Translation speed against python-fhir-converter 0.3.0, side by side in one run.

    python bench/bench_translate.py [--rounds 7] [--per-round 20] [--file Discharge_Summary.ccda]

Ours: the whole ``gateway translate`` path (ingest with the hardened parser, translate, label,
validate every resource, serialise the Bundle).  Peer: ``CcdaRenderer().render_to_fhir("DischargeSummary")``
in its own venv (bench/setup_peer.sh), compiled once.  Rounds alternate between the two so machine
noise hits both (4 documents each way, 40 times); the figure that matters is the ratio of medians,
the ratio of minimums shows the noise-free floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from gateway.mappings import load_mappings  # noqa: E402
from gateway.pipeline import translate_letter  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.translate.registry import SECTION_TRANSLATORS  # noqa: E402

DEFAULT_FILE = ROOT / "tests" / "fixtures" / "ccda" / "Discharge_Summary.ccda"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--template", default="DischargeSummary")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--peer-venv", default=None)
    args = parser.parse_args()

    venv = (
        args.peer_venv
        or subprocess.run([str(HERE / "setup_peer.sh")], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    peer = subprocess.Popen(
        [f"{venv}/bin/python", str(HERE / "peer_render.py"), str(args.file), args.template],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.stdout and peer.stdin
    assert peer.stdout.readline().strip() == "ready"

    raw = args.file.read_bytes()
    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    settings = Settings()
    result = translate_letter(raw, name=args.file.name, mappings=mappings, settings=settings)  # warm-up
    size = len(result.json())

    ours: list[float] = []
    ours_cpu: list[float] = []  # this thread's CPU time: what the gateway costs, whatever else runs
    theirs: list[float] = []
    for _ in range(args.rounds):
        peer.stdin.write(f"{args.per_round}\n")
        peer.stdin.flush()
        theirs.extend(json.loads(peer.stdout.readline()))
        for _ in range(args.per_round):
            start, start_cpu = time.perf_counter(), time.thread_time()
            translate_letter(raw, name=args.file.name, mappings=mappings, settings=settings).json()
            ours_cpu.append((time.thread_time() - start_cpu) * 1000)
            ours.append((time.perf_counter() - start) * 1000)
    peer.stdin.close()
    peer.wait()

    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(
        f"file: {args.file.name} ({len(raw) / 1024:.0f} KiB); output {len(result.bundle['entry'])} resources, "
        f"{size / 1024:.0f} KiB JSON"
    )
    print(
        f"gateway translate (parse+translate+label+validate+serialise): median {ours_med:.2f} ms/doc, "
        f"p90 {sorted(ours)[int(len(ours) * 0.9)]:.2f} ms, n={len(ours)}"
    )
    print(
        f"gateway translate CPU time (thread_time): median {statistics.median(ours_cpu):.2f} ms/doc, "
        f"min {min(ours_cpu):.2f} ms"
    )
    print(
        f"python-fhir-converter 0.3.0 render_to_fhir({args.template}): median {theirs_med:.2f} ms/doc, "
        f"p90 {sorted(theirs)[int(len(theirs) * 0.9)]:.2f} ms, n={len(theirs)}"
    )
    ours_min, theirs_min = min(ours), min(theirs)
    print(
        f"ratio gateway/peer: {ours_med / theirs_med:.3f} of medians (bar: <= 0.200); "
        f"{ours_min / theirs_min:.3f} of minimums ({ours_min:.2f} / {theirs_min:.2f} ms)"
    )
    return 0 if ours_med / theirs_med <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
