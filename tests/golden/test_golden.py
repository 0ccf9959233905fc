"""Golden tests: each case's whole output Bundle is stored and diffed.

Run ``UPDATE_GOLDEN=1 pytest tests/golden`` after an intended change and review the diff in git.
Embedded originals (base64 of the letter) are replaced by their SHA-256 and size, so the stored
files stay readable; the rule tests check the embedding itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import available_cases, run_case

EXPECTED = Path(__file__).parent / "expected"


def _normalise(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _normalise(v) for k, v in node.items()}
        if isinstance(node.get("data"), str) and node.get("contentType") not in (None, "application/xhtml+xml"):
            raw = base64.b64decode(node["data"])
            out["data"] = f"sha256:{hashlib.sha256(raw).hexdigest()} ({len(raw)} bytes)"
        if node.get("contentType") == "application/xhtml+xml" and isinstance(node.get("data"), str):
            out["data"] = base64.b64decode(node["data"]).decode("utf-8")
        return out
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return node


def _first_difference(expected: Any, actual: Any, path: str = "Bundle") -> str | None:
    if type(expected) is not type(actual):
        return f"{path}: expected {type(expected).__name__}, got {type(actual).__name__}"
    if isinstance(expected, dict):
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                return f"{path}.{key}: missing"
            if key not in expected:
                return f"{path}.{key}: unexpected"
            found = _first_difference(expected[key], actual[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list):
        if len(expected) != len(actual):
            return f"{path}: expected {len(expected)} items, got {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            found = _first_difference(e, a, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if expected == actual else f"{path}: expected {expected!r}, got {actual!r}"


@pytest.mark.parametrize("case", available_cases())
def test_output_matches_golden(case: str) -> None:
    actual = _normalise(run_case(case).bundle)
    path = EXPECTED / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("CI") and not path.exists():
            pytest.fail(f"golden file {path.name} is missing")
        path.write_text(json.dumps(actual, ensure_ascii=False, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    difference = _first_difference(expected, actual)
    assert difference is None, f"{case}: {difference} (UPDATE_GOLDEN=1 to accept an intended change)"
