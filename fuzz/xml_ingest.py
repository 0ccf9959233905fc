"""atheris (libFuzzer) target for the XML ingest: bytes → ``gateway.ingest.read`` (parse, safety checks,
document-type detection).

A :class:`~gateway.errors.GatewayError` is a refusal, the expected answer to bad input; any other
exception is a crash and stops the run with the input saved by libFuzzer (``crash-<sha1>``).

    .venv/bin/python fuzz/xml_ingest.py [CORPUS_DIR ...] -atheris_runs=5000 -max_total_time=60 -max_len=262144

``tests/fuzz/test_atheris.py`` runs it bounded in CI with a seed corpus built from the fixtures.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    import gateway.ingest
    import gateway.ingest.xml

from gateway.errors import GatewayError
from gateway.mappings import load_mappings
from gateway.translate.registry import SECTION_TRANSLATORS

MAPPINGS = load_mappings(translators=SECTION_TRANSLATORS)


def TestOneInput(data: bytes) -> None:
    try:
        gateway.ingest.read(data, name="fuzz", mappings=MAPPINGS, max_bytes=1024 * 1024)
    except GatewayError:
        return


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
