"""What the in-process benches share: an ASGI POST without a socket, and old-vs-new runs interleaved.

``--compare DIR`` in ``bench_accept.py``, ``bench_prepare.py`` and ``bench_receiver.py`` runs the bench
on DIR's code and on this checkout's in alternating processes (each side first every other turn), so a
noisy machine drifts on both sides alike, and prints medians and the per-turn paired ratios.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
Results = dict[str, list[dict[str, float]]]


def use_code(code: Path) -> None:
    """Import ``gateway`` from ``code`` (another checkout), and check that it did."""
    sys.path.insert(0, str(code.resolve()))
    import gateway

    assert Path(gateway.__file__).resolve().is_relative_to(code.resolve()), gateway.__file__


async def asgi_post(
    app: Any, path: str, body: bytes, headers: Iterable[tuple[bytes, bytes]], scheme: str = "http", port: int = 8080
) -> tuple[int, bytes]:
    """POST ``body`` to ``app`` as an ASGI server would (no socket, no HTTP parsing): (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", f"127.0.0.1:{port}".encode()),
            *headers,
            (b"accept", b"application/fhir+json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", port),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def interleaved(script: str, other: Path, turns: int, arguments: list[str]) -> tuple[dict[str, Path], Results]:
    """Run ``script --json --code SIDE *arguments`` on both sides, ``turns`` times, alternating."""
    sides = {"other": other.resolve(), "this": ROOT}
    results: Results = {name: [] for name in sides}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for turn in range(turns):
        # each side first every other turn: whatever the first process of a turn pays, both pay alike
        for name, code in sorted(sides.items(), reverse=turn % 2 == 1):
            out = subprocess.run(
                [sys.executable, script, *arguments, "--json", "--code", str(code)],
                check=True,
                capture_output=True,
                cwd=code,
                env=env,
            ).stdout
            results[name].append(orjson.loads(out.splitlines()[-1]))
    return sides, results


def report(sides: dict[str, Path], results: Results, keys: Iterable[str] | None = None) -> None:
    """Medians per side, and the median of the per-turn this/other ratios (the machine's drift cancels)."""
    print(f"{'CPU ms, median of runs':32} {'other':>8} {'this':>8} {'this/other (paired)':>20}")
    print(f"  other = {sides['other']}, this = {sides['this']}")
    for key in keys or list(results["this"][0]):
        other = statistics.median(r[key] for r in results["other"])
        this = statistics.median(r[key] for r in results["this"])
        ratios = sorted(t[key] / o[key] for o, t in zip(results["other"], results["this"], strict=True))
        print(f"{key:32} {other:8.3f} {this:8.3f} {statistics.median(ratios):20.3f}")
