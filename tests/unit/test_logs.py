"""The log pipeline's guarantees, one at a time: JSON lines, safe exceptions, redaction, no query strings."""

from __future__ import annotations

import io
import logging
from typing import Any

import orjson
import pytest
from lxml import etree

from gateway import audit, logs
from gateway.metrics import Metrics, refusal_reason


def _lines(json_logs: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in json_logs.getvalue().splitlines()]


def test_structlog_and_stdlib_records_are_json_lines_with_bound_ids(json_logs: io.StringIO) -> None:
    with logs.bound(letter_id="L1"):
        logs.get_logger("gateway.x").info("delivery attempt", message_id="M1", recipient="PractitionerRole-a")
        logging.getLogger("some.library").warning("plain %s record", "stdlib")
    first, second = _lines(json_logs)
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["letter_id"] == "L1" and first["message_id"] == "M1" and first["level"] == "info"
    assert second == {
        "timestamp": second["timestamp"],
        "level": "warning",
        "logger": "some.library",
        "event": "plain stdlib record",
        "letter_id": "L1",
    }


def test_an_exception_is_logged_by_type_and_class_never_by_its_text(json_logs: io.StringIO) -> None:
    try:
        etree.fromstring(b"<ROUX><COLETTE>248057511410235</ROUX>")
    except etree.XMLSyntaxError as exc:
        assert "ROUX" in str(exc), "the raw message quotes the document"
        logs.get_logger("gateway.x").exception("letter not parsed", letter_id="L1")
        logging.getLogger("gateway.api").exception("unexpected error")
        try:
            raise RuntimeError("wrapped: ROUX") from exc
        except RuntimeError:
            logs.get_logger("gateway.x").error("again", exc_info=True)
    captured = json_logs.getvalue()
    assert "ROUX" not in captured and "COLETTE" not in captured and "248057511410235" not in captured
    structured, stdlib, chained = _lines(json_logs)
    for line in (structured, stdlib):
        assert line["exc_type"] == "lxml.etree.XMLSyntaxError"
        assert line["exc_class"] == "ERR_TAG_NAME_MISMATCH"
        assert any("test_logs.py" in str(f) for f in line["exc_frames"])
    assert chained["exc_type"] == "RuntimeError"
    assert chained["exc_causes"] == [
        {
            "type": "lxml.etree.XMLSyntaxError",
            "error_class": "ERR_TAG_NAME_MISMATCH",
            "frames": chained["exc_causes"][0]["frames"],
        }
    ]


def test_the_last_line_of_defence_redacts_patient_keys_and_ins_shaped_numbers(json_logs: io.StringIO) -> None:
    log = logs.get_logger("gateway.x")
    log.info("search for 1.2.250.1.213.1.4.10|248057511410235 done", patient="ROUX", family_name="ROUX")
    log.info("nir", detail="NIR 2 48 05 75 114 102 35", birthDate="1948-05-17", nested={"given": "COLETTE"})
    log.info(
        "kept",
        hash="3f1a248057511410235b0c",  # digits inside a hash are not an INS
        letter_id="6c9e2a40-1c7b-4f5e-9d1a-0a4e2b8c1d2e",
        duration_ms=12.5,
        recipients=3,
    )
    first, second, third = _lines(json_logs)
    assert first["event"] == "search for 1.2.250.1.213.1.4.10|[redacted] done"
    assert first["patient"] == first["family_name"] == "[redacted]"
    assert second["detail"] == "NIR [redacted]"
    assert second["birthDate"] == "[redacted]" and second["nested"] == {"given": "[redacted]"}
    assert third["hash"] == "3f1a248057511410235b0c" and third["recipients"] == 3
    assert third["letter_id"] == "6c9e2a40-1c7b-4f5e-9d1a-0a4e2b8c1d2e"


def test_uvicorns_access_line_loses_its_query_string(json_logs: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO)
    access.info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        "/Consent?patient=urn:oid:1.2.250.1.213.1.4.8|1234567890123",
        "1.1",
        200,
    )
    (line,) = _lines(json_logs)
    assert line["event"] == '127.0.0.1:5000 - "GET /Consent HTTP/1.1" 200'


def test_console_format_for_development() -> None:
    buffer = io.StringIO()
    handler = logs.configure("console", "INFO", buffer)
    try:
        logs.get_logger("gateway.x").info("letter accepted", letter_id="L1")
    finally:
        logs.reset(handler)
    assert "letter accepted" in buffer.getvalue() and "letter_id=L1" in buffer.getvalue()
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml", "INFO", buffer)  # type: ignore[arg-type]


def test_a_refusal_is_counted_by_the_issue_code_the_audit_records() -> None:
    event = audit.refusal_event("security", "DOCTYPE declaration refused", "client-x", "2026-11-05T11:30:00+01:00")
    assert refusal_reason(event) == "security"
    assert refusal_reason(audit.operation_event("MessageHeader/m", "replay", "who", "2026-11-05T11:30:00Z")) is None
    metrics = Metrics()
    metrics.letter_refused("security")
    metrics.letter_refused("Not A Code: 248057511410235")  # never a label made of free text
    assert metrics.registry.get_sample_value("gateway_letters_refused_total", {"reason": "security"}) == 1
    assert metrics.registry.get_sample_value("gateway_letters_refused_total", {"reason": "other"}) == 1
