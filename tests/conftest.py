"""Shared test fixtures: the mapping set, the fixture corpus, and a deterministic translate()."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.mappings import Mappings, load_mappings
from gateway.pipeline import Result, translate_letter
from gateway.settings import Settings
from gateway.translate.registry import SECTION_TRANSLATORS

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FIXED_NOW = datetime(2026, 1, 15, 10, 0, 0, tzinfo=UTC)

# (letter, priors) pairs translated by the golden and rule tests; names are relative to FIXTURES
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ldl-ses-s1-2022": ("cda/ldl-ses-s1-2022.xml", ()),
    "ldl-ses-s1-2022+ees": ("cda/ldl-ses-s1-2022.xml", ("cda/ldl-ees-s1-2022.xml",)),
    "ldl-ses-s1-2022+fhir-list": ("cda/ldl-ses-s1-2022.xml", ("fhir/prior-list-s1.json",)),
    "ldl-ses-s8-2020": ("cda/ldl-ses-s8-2020.xml", ()),
    "ldl-ses-s8-2020+vsm": ("cda/ldl-ses-s8-2020.xml", ("cda/vsm-s8.xml",)),
    "fhir-document-s1": ("fhir/document-s1.json", ()),
    "fhir-document-s1+ees": ("fhir/document-s1.json", ("cda/ldl-ees-s1-2022.xml",)),
    "ccda-discharge-summary": ("ccda/Discharge_Summary.ccda", ()),
    "ccda-ccd": ("ccda/CCD.ccda", ()),
    "ccda-transfer-summary": ("ccda/Transfer_Summary.ccda", ()),
}


def fixture_path(relative: str) -> Path:
    return FIXTURES / relative


def available_cases() -> list[str]:
    return [
        name
        for name, (letter, priors) in CASES.items()
        if fixture_path(letter).exists() and all(fixture_path(p).exists() for p in priors)
    ]


_MAPPINGS: Mappings | None = None


def mappings() -> Mappings:
    global _MAPPINGS
    if _MAPPINGS is None:
        _MAPPINGS = load_mappings(translators=SECTION_TRANSLATORS)
    return _MAPPINGS


_RESULTS: dict[str, Result] = {}


def run_case(name: str) -> Result:
    """Translate one named case (cached: the rule tests look at the same outputs many times)."""
    if name not in _RESULTS:
        letter, priors = CASES[name]
        path = fixture_path(letter)
        prior_data = [(fixture_path(p).read_bytes(), fixture_path(p).name) for p in priors]
        _RESULTS[name] = translate_letter(
            path.read_bytes(),
            name=path.name,
            mappings=mappings(),
            settings=Settings(),
            prior=prior_data,
            now=FIXED_NOW,
        )
    return _RESULTS[name]


def resources(result: Result) -> list[dict[str, Any]]:
    return [e["resource"] for e in result.bundle["entry"]]


@pytest.fixture(scope="session")
def mapping_set() -> Mappings:
    return mappings()
