"""Counts of generated cases, printed at the end of the pytest run (CI output quotes them).

Fuzz and schemathesis tests call :func:`record`; the ``pytest_terminal_summary`` hook below is
registered from ``tests/conftest.py`` so it runs whatever part of the suite is collected, and prints
one block such as::

    == fuzz: cda-ingest 300 cases, 0 crashes; fhir-ingest 300 cases, 0 crashes; schemathesis 412 calls, 17 operations, 0 failures ==

Records with the same name add up (a test run in several parts, or parametrized).  Nothing is printed
when no test recorded anything.
"""

from __future__ import annotations

import pytest

__all__ = ["pytest_terminal_summary", "record", "recorded", "summary_line"]

_RECORDS: dict[str, tuple[int, str, dict[str, int | str]]] = {}


def record(name: str, cases: int, **details: int | str) -> None:
    """Count ``cases`` cases run by ``name``; ``unit="runs"`` names what was counted (default ``cases``);
    integer details (``crashes=0``, ``failures=0``...) add up over records of the same name, others replace."""
    unit = str(details.pop("unit", "cases"))
    old_cases, _old_unit, old = _RECORDS.get(name, (0, unit, {}))
    merged: dict[str, int | str] = dict(old)
    for key, value in details.items():
        previous = merged.get(key)
        merged[key] = previous + value if isinstance(previous, int) and isinstance(value, int) else value
    _RECORDS[name] = (old_cases + cases, unit, merged)


def recorded() -> dict[str, tuple[int, str, dict[str, int | str]]]:
    """What was recorded so far (a copy)."""
    return {name: (cases, unit, dict(details)) for name, (cases, unit, details) in _RECORDS.items()}


def summary_line() -> str:
    parts = []
    for name, (cases, unit, details) in _RECORDS.items():
        extra = "".join(f", {value} {key}" for key, value in details.items())
        parts.append(f"{name} {cases} {unit}{extra}")
    return "fuzz: " + "; ".join(parts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if _RECORDS:
        terminalreporter.write_sep("=", summary_line())
