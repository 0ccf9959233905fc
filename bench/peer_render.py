"""Runs inside the python-fhir-converter venv: renders a C-CDA file on request and reports timings.

Protocol (stdin/stdout, one line each): "<n>" → renders the file n times, answers the per-render
milliseconds as a JSON list.  Kept in its own process because the peer's pins clash with ours.
"""

import json
import sys
import time

from fhir_converter.renderers import CcdaRenderer

path, template = sys.argv[1], sys.argv[2]
with open(path, "rb") as handle:
    data = handle.read()
renderer = CcdaRenderer()
renderer.render_to_fhir(template, data)  # compile templates once, like a long-running service
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        renderer.render_to_fhir(template, data)
        times.append((time.perf_counter() - start) * 1000)
    sys.stdout.write(json.dumps(times) + "\n")
    sys.stdout.flush()
