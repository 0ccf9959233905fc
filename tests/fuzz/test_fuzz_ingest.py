"""Fuzzing the way in: mutated CDA and FHIR letters through ``gateway translate`` and ``POST /letters``.

Every outcome is a translation or a :class:`GatewayError` (directly), a 2xx or a 4xx OperationOutcome
(over HTTP) — never a foreign exception, never a 500 — and a refused letter stores nothing but its
refusal's audit record.  Runs are bounded and derandomized (the same cases on every run, no example
database), so CI is reproducible; the counts are printed at the end of the run (``tests/fuzz/counts.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.pipeline import translate_letter
from gateway.settings import Settings
from tests.conftest import mappings
from tests.fuzz import counts
from tests.fuzz.strategies import cda_documents, fhir_documents
from tests.fuzz.world import World, world

# a failing case is a whole letter: hypothesis warns its repr is large (and the suite turns warnings into errors)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

NOW = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
DIRECT_EXAMPLES = 300
HTTP_EXAMPLES = 150
FUZZ = settings(
    max_examples=DIRECT_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cases = self.accepted = self.refused = 0

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc: object) -> None:
        # a failing case stops the run: it is reported by pytest, and counted as the crash it is
        crashes = 0 if exc[0] is None else 1
        counts.record(self.name, self.cases, crashes=crashes, accepted=self.accepted, refused=self.refused)


def _translate(raw: bytes, tally: Tally) -> None:
    tally.cases += 1
    try:
        result = translate_letter(raw, name="fuzz", mappings=mappings(), settings=Settings(), now=NOW)
    except GatewayError as error:
        tally.refused += 1
        outcome = error.to_operation_outcome()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["diagnostics"]
        return
    tally.accepted += 1
    assert result.bundle["resourceType"] == "Bundle" and result.bundle["entry"]


def test_cda_translate_never_crashes() -> None:
    with Tally("cda-ingest") as tally:

        @FUZZ
        @given(cda_documents())
        def run(raw: bytes) -> None:
            _translate(raw, tally)

        run()


def test_fhir_translate_never_crashes() -> None:
    with Tally("fhir-ingest") as tally:

        @FUZZ
        @given(fhir_documents())
        def run(raw: bytes) -> None:
            _translate(raw, tally)

        run()


# -- over HTTP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(tmp_path_factory.mktemp("fuzz-http")) as w:
        yield w


def _check_push(w: World, raw: bytes, content_type: str, tally: Tally) -> None:
    tally.cases += 1
    before = w.rows()
    response = w.push(raw, content_type)
    after = w.rows()
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        tally.refused += 1
        body = response.json()
        assert body["resourceType"] == "OperationOutcome", body
        assert body["issue"] and body["issue"][0]["severity"] == "error", body
        # nothing stored but the audit of the refusal
        assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"]), (before, after)
        assert after["audit_event"] == before["audit_event"] + 1, (before, after)
    else:
        tally.accepted += 1
        assert response.status_code in (200, 202), response.text
        assert response.json()["letterId"]


def _http_fuzz(
    service: World, name: str, strategy: st.SearchStrategy[bytes], content_types: list[str]
) -> Callable[[], Any]:
    tally = Tally(name)

    @settings(FUZZ, max_examples=HTTP_EXAMPLES)
    @given(strategy, st.sampled_from(content_types))
    def run(raw: bytes, content_type: str) -> None:
        _check_push(service, raw, content_type, tally)

    def go() -> None:
        with tally:
            run()

    return go


def test_cda_post_letters_never_500(service: World) -> None:
    _http_fuzz(service, "cda-http", cda_documents(), ["application/hl7-cda+xml", "text/xml", "application/json"])()


def test_fhir_post_letters_never_500(service: World) -> None:
    _http_fuzz(service, "fhir-http", fhir_documents(), ["application/fhir+json", "application/xml"])()


def test_the_service_still_works_after_the_fuzzing(service: World, tmp_path: Path) -> None:
    """The fuzzed letters that were accepted are delivered like any other; the audit chain is intact."""
    service.deliver_all()
    from gateway.auditlog import verify

    report = verify(service.store.engine, [])
    assert report.ok, report.problems
