"""The atheris target for the XML ingest (``fuzz/xml_ingest.py``), run bounded in a subprocess.

The seed corpus is every CDA / C-CDA fixture, the bad ones included; libFuzzer mutates from there.
Any exception other than a GatewayError is a crash: libFuzzer exits non-zero and saves the input.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT
from tests.fuzz import counts

RUNS = 3000
TARGET = ROOT / "fuzz" / "xml_ingest.py"


def _atheris_missing() -> str | None:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the machine
        return f"atheris cannot be imported here: {exc}"
    return None


@pytest.mark.skipif(_atheris_missing() is not None, reason=str(_atheris_missing()))
def test_xml_ingest_under_libfuzzer(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [
        *(FIXTURES / "cda").rglob("*.xml"),
        *(FIXTURES / "ccda").glob("*.ccda"),
        *(FIXTURES / "dispatch").glob("*.xml"),
    ]
    for seed in seeds:
        shutil.copy(seed, corpus / f"{seed.parent.name}-{seed.name}")
    process = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            str(corpus),
            f"-atheris_runs={RUNS}",
            "-max_total_time=60",
            "-max_len=131072",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = process.stdout + process.stderr
    done = re.search(r"Done (\d+) (?:runs )?in", output)
    crashed = process.returncode != 0
    counts.record("atheris-xml", int(done.group(1)) if done else 0, unit="runs", crashes=int(crashed), seeds=len(seeds))
    assert not crashed, output[-4000:]
    assert done is not None, output[-4000:]
    assert int(done.group(1)) >= RUNS // 2, output[-2000:]
