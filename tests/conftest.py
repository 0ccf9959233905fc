"""Shared test fixtures: the mapping set, the fixture corpus, and a deterministic translate()."""

from __future__ import annotations

import getpass
import io
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from gateway.mappings import Mappings, load_mappings
from gateway.outbox import Outbox
from gateway.pipeline import Result, translate_letter
from gateway.settings import Settings
from gateway.store import make_engine
from gateway.translate.registry import SECTION_TRANSLATORS
from tests.fuzz.counts import pytest_terminal_summary  # noqa: F401  (prints the fuzz/schemathesis counts)

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


# -- databases: every storage-backed test runs on SQLite and on PostgreSQL ------------------------------
# GATEWAY_TEST_POSTGRES_URL names a server database the tests may connect to and create databases from
# (default: the local server, as postgres then as the OS user); set it to "off" to skip PostgreSQL.
_PG_CANDIDATES = (
    [os.environ["GATEWAY_TEST_POSTGRES_URL"]]
    if "GATEWAY_TEST_POSTGRES_URL" in os.environ
    else [f"postgresql://{user}@127.0.0.1:5432/test" for user in ("postgres", getpass.getuser())]
)
_PG: dict[str, str] = {}  # "url" once a candidate answered, else "skip": why not (probed once per session)


def _postgres_admin_url() -> str:
    """The server URL the tests use, or a clean skip saying why PostgreSQL cannot be used."""
    if not _PG:
        errors = []
        for url in _PG_CANDIDATES:
            if url.lower() in ("", "off", "no", "0"):
                errors.append("disabled by GATEWAY_TEST_POSTGRES_URL")
                continue
            try:
                with psycopg.connect(url, connect_timeout=3, autocommit=True):
                    _PG["url"] = url
                    break
            except psycopg.Error as exc:
                errors.append(f"{url}: {str(exc).strip().splitlines()[0]}")
        else:
            _PG["skip"] = "PostgreSQL unreachable (set GATEWAY_TEST_POSTGRES_URL) — " + "; ".join(errors)
    if "skip" in _PG:
        pytest.skip(_PG["skip"])
    return _PG["url"]


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database, dropped afterwards (even with connections left open).

    Where the role may not CREATE DATABASE, a fresh schema in the server database instead (selected
    with ``search_path``), dropped with CASCADE.
    """
    admin_url = _postgres_admin_url()
    name = f"gw_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            url = make_url(admin_url).set(database=name)
        except psycopg.errors.InsufficientPrivilege:
            admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
            drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
            url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(drop)


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A fresh PostgreSQL database for a test that needs PostgreSQL itself (skipped if unreachable)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty gateway database: a SQLite file, then a PostgreSQL database (the same tests on both)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def outbox(database_url: str) -> Iterator[Outbox]:
    """An outbox on a fresh database (SQLite, then PostgreSQL), its engines disposed afterwards."""
    engine = make_engine(database_url)
    found = Outbox(engine)
    yield found
    found.reader.dispose()
    engine.dispose()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The gateway's JSON log lines during the test, as ``gateway serve`` configures them (into a buffer)."""
    from gateway import logs

    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = logs.configure("json", "INFO", buffer)
    yield buffer
    logs.reset(handler)
    root.setLevel(level)
