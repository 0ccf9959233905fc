"""schemathesis against the gateway's own OpenAPI, in process (ASGI), authenticated as an admin.

Every operation the schema declares gets a bounded number of generated requests (derandomized: the
same ones on every run); each response must not be a server error, must have a status the operation
declares, and must match the declared response schema.  Failures are collected over all operations
(so the printed count is complete) and reported together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.fuzz import counts
from tests.fuzz.world import ADMIN, World, auth, world

EXAMPLES_PER_OPERATION = 40
CHECKS: list[Any] = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(tmp_path_factory.mktemp("schemathesis")) as w:
        yield w


def _runner(operation: Any, calls: list[int], failures: list[str]) -> Callable[[], None]:
    label = operation.label

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        calls.append(1)
        response = case.call(headers=auth(ADMIN))
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as failure:  # a check failed: keep going, report them all
            text = " ".join(str(failure).split())
            title = text.split(" - ", 1)[-1].split(" Received")[0][:120]
            failures.append(f"{label}: {response.status_code}: {title} || {text[:600]}")

    return run


def test_the_api_matches_its_openapi(service: World) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app)
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) >= 10, [op.label for op in operations]
    calls: list[int] = []
    failures: list[str] = []
    for operation in operations:
        _runner(operation, calls, failures)()
    distinct = sorted({f.split(" || ")[0] for f in failures})
    counts.record(
        "schemathesis",
        len(calls),
        unit="calls",
        operations=len(operations),
        failures=len(failures),
        distinct=len(distinct),
    )
    examples = {f.split(" || ")[0]: f for f in failures}
    assert not distinct, "\n".join(examples[d] for d in distinct[:20])
