"""Bad input is refused with a typed error naming what and where; good input is parsed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import ingest
from gateway.errors import (
    EncodingError,
    GatewayError,
    IngestError,
    MissingIdentity,
    TooLarge,
    UnsafeInput,
    UnsupportedDocument,
)
from gateway.pipeline import translate_letter
from gateway.settings import Settings
from tests.conftest import FIXTURES, ROOT, mappings

BAD = FIXTURES / "cda" / "bad"

EXPECTED: dict[str, tuple[type[GatewayError], str]] = {
    "xxe-file.xml": (UnsafeInput, "security"),
    "xxe-network.xml": (UnsafeInput, "security"),
    "billion-laughs.xml": (UnsafeInput, "security"),
    "quadratic-blowup.xml": (UnsafeInput, "security"),
    "deep-nesting.xml": (UnsafeInput, "security"),
    "malformed.xml": (IngestError, "structure"),
    "latin1-declared-utf8.xml": (EncodingError, "structure"),
    "unknown-type.xml": (UnsupportedDocument, "not-supported"),
    "no-patient-identity.xml": (MissingIdentity, "required"),
    "not-xml.xml": (IngestError, "structure"),
}


def _translate(raw: bytes, name: str = "letter.xml", **kwargs: object) -> object:
    return translate_letter(raw, name=name, mappings=mappings(), settings=Settings(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_fixture_is_refused_with_a_typed_error(name: str) -> None:
    error_type, code = EXPECTED[name]
    with pytest.raises(error_type) as caught:
        _translate((BAD / name).read_bytes(), name)
    error = caught.value
    assert error.issue_code == code or isinstance(error, UnsupportedDocument)
    assert error.where.source == name
    outcome = error.to_operation_outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert outcome["issue"][0]["code"] == error.issue_code


def test_every_bad_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)


def test_xxe_never_reads_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    raw = (
        f'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&x;</title></ClinicalDocument>'
    ).encode()
    with pytest.raises(UnsafeInput) as caught:
        _translate(raw)
    assert "TOP-SECRET-VALUE" not in str(caught.value.to_operation_outcome())


def test_doctype_hidden_in_utf16_is_refused() -> None:
    raw = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]><x/>'.encode("utf-16")
    with pytest.raises(UnsafeInput):
        _translate(raw)


def test_xinclude_is_refused() -> None:
    raw = (
        b'<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xi="http://www.w3.org/2001/XInclude">'
        b'<xi:include href="file:///etc/passwd" parse="text"/></ClinicalDocument>'
    )
    with pytest.raises(UnsafeInput):
        _translate(raw)


def test_size_limit_is_configurable() -> None:
    raw = (FIXTURES / "cda" / "ldl-ses-s1-2022.xml").read_bytes()
    with pytest.raises(TooLarge) as caught:
        _translate(raw, max_document_bytes=1000)
    assert caught.value.issue_code == "too-long"
    assert _translate(raw) is not None


def test_default_limit_is_ten_megabytes() -> None:
    assert Settings().max_document_bytes == 10 * 1024 * 1024
    with pytest.raises(TooLarge):
        ingest.read(b"<" + b"a" * (10 * 1024 * 1024), name="big.xml", mappings=mappings())


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", UnsupportedDocument),
        (b"   \n", UnsupportedDocument),
        (b"%PDF-1.7 binary", UnsupportedDocument),
        (b"{not json", IngestError),
        (b'{"resourceType": "Bundle", "type": "document", "entry": [] ', IngestError),
        (b'["a"]', IngestError),
        (b'{"resourceType": "Patient", "id": "x"}', UnsupportedDocument),
        (b'{"resourceType": "Bundle", "type": "searchset"}', UnsupportedDocument),
        (b'{"resourceType": "Bundle", "type": "document", "entry": []}', IngestError),
        (b'{"a": "\xff"}', EncodingError),
        (b"<html><body>hello</body></html>", UnsupportedDocument),
        (b'<?xml version="1.0" encoding="NOPE-42"?><x/>', EncodingError),
    ],
)
def test_malformed_or_unknown_inputs(raw: bytes, error: type[GatewayError]) -> None:
    with pytest.raises(error):
        _translate(raw)


def test_entry_letter_is_only_a_prior() -> None:
    raw = (FIXTURES / "cda" / "ldl-ees-s1-2022.xml").read_bytes()
    with pytest.raises(UnsupportedDocument, match="only be used as prior"):
        _translate(raw)


def test_fhir_document_must_start_with_a_composition() -> None:
    path = FIXTURES / "fhir" / "document-no-composition.json"
    with pytest.raises(IngestError, match="Composition"):
        _translate(path.read_bytes(), path.name)


def test_prior_of_another_patient_is_refused() -> None:
    letter = (FIXTURES / "cda" / "ldl-ses-s8-2020.xml").read_bytes()
    prior = (FIXTURES / "cda" / "ldl-ees-s1-2022.xml").read_bytes()
    with pytest.raises(IngestError, match="same patient"):
        translate_letter(letter, name="s8.xml", mappings=mappings(), settings=Settings(), prior=[(prior, "ees.xml")])


@pytest.mark.parametrize("name", ["xxe-file.xml", "malformed.xml", "no-patient-identity.xml", "unknown-type.xml"])
def test_cli_refuses_with_one_line_and_no_traceback(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "translate", str(BAD / name), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("refused: ") and name in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "nothing is written for a refused letter"


def test_cli_missing_file_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "translate", str(tmp_path / "nope.xml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "nope.xml" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unwritable_output_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "translate",
            str(FIXTURES / "cda" / "ldl-ses-s1-2022.xml"),
            "-o",
            str(tmp_path / "missing" / "out.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "out.json" in proc.stderr.splitlines()[-1]
