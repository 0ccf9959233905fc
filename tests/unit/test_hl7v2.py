"""HL7 v2 messages as real senders write them: the letter is found, or refused with the right answer.

Every variant below was met in hospital interfaces: other segment separators and delimiters, escape
sequences, Latin-1, the base64 split or wrapped, the CDA as escaped text or inside a MIME package, a
reference instead of the content, a PDF instead of the CDA, PID-3 against the CDA's patient.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from hl7apy.parser import parse_message

from gateway.errors import EncodingError, MissingIdentity, TooLarge, UnsafeInput
from gateway.ingest import hl7v2
from gateway.ingest.hl7v2 import Answer, Hl7Refusal, PatientId, PatientMismatch, UnsupportedMessage
from tests.hl7v2_messages import CDA_S1, PDF, S1_PID, ed, mdm, message, msh, pid

MAX = 10 * 1024 * 1024
B64 = base64.b64encode(CDA_S1).decode()


def read(raw: bytes, **kw: object) -> hl7v2.Hl7Letter:
    return hl7v2.read_message(raw, max_bytes=int(kw.pop("max_bytes", MAX)), **kw)  # type: ignore[arg-type]


def refused(raw: bytes, **kw: object) -> Answer:
    with pytest.raises(Hl7Refusal) as caught:
        read(raw, **kw)
    return hl7v2.answer_for(caught.value)


def escape(text: str) -> str:
    """HL7 escaping, written independently of the module under test."""
    out = text.replace("\\", "\\E\\")
    for char, code in (("|", "F"), ("^", "S"), ("&", "T"), ("~", "R")):
        out = out.replace(char, f"\\{code}\\")
    return out


# -- framing and syntax ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_any_segment_separator(sep: str) -> None:
    letter = read(message(msh(), "EVN|T02|20261105", pid(), ed(1, CDA_S1), sep=sep))
    assert letter.document == CDA_S1
    assert letter.header.control_id == "MSG00001" and letter.header.message_type == "MDM"
    assert [p.value for p in letter.patient_ids] == ["IPP0004527891", "244037511305285"]
    assert letter.patient_ids[0].oid == "1.2.250.1.213.1.1.9.1.1" and letter.patient_ids[0].type_code == "PI"


def test_delimiters_come_from_msh() -> None:
    standard = message(msh(), pid(), ed(1, CDA_S1)).decode()
    table = str.maketrans({"|": "!", "^": "#", "~": "*", "\\": "$", "&": "%"})
    odd = standard.translate(table).encode()
    assert odd.startswith(b"MSH!#*$%!DPI!")
    letter = read(odd)
    assert letter.document == CDA_S1
    assert letter.patient_ids[1] == PatientId("244037511305285", "ASIP-SANTE-INS-NIR", "1.2.250.1.213.1.4.10", "INS")


def test_escape_sequences_in_fields() -> None:
    name = "IPP\\F\\1\\S\\2\\T\\3\\R\\4\\E\\5\\X41\\"  # | ^ & ~ \ and hex "A"
    letter = read(message(msh(), pid(f"{name}^^^CHU&1.2.3&ISO^PI"), ed(1, CDA_S1)))
    assert letter.patient_ids[0].value == "IPP|1^2&3~4\\5A"


def test_cda_as_escaped_tx_lines() -> None:
    lines = CDA_S1.decode().split("\n")
    obx = [f"OBX|{i + 1}|TX|11490-0^Lettre^LN|1|{escape(line)}||||||F" for i, line in enumerate(lines)]
    assert read(message(msh(), pid(), *obx)).document == CDA_S1


def test_cda_as_ft_with_formatting_escapes() -> None:
    text = "\\.br\\".join(escape(line) for line in CDA_S1.decode().split("\n"))
    assert read(message(msh(), pid(), f"OBX|1|FT|11490-0^Lettre^LN||{text}||||||F")).document == CDA_S1


def test_ed_plain_text_encoding_a() -> None:
    raw = message(msh(), pid(), ed(1, b"", encoding="A", text=escape(CDA_S1.decode()).replace("\n", "\\X0A\\")))
    assert read(raw).document == CDA_S1


def test_ed_hex_encoding() -> None:
    assert read(message(msh(), pid(), ed(1, b"", encoding="Hex", text=CDA_S1.hex().upper()))).document == CDA_S1


# -- the base64 as senders cut it -----------------------------------------------------------------------
def test_base64_split_over_obx_with_the_same_sub_id() -> None:
    chunks = [B64[i : i + 20000] for i in range(0, len(B64), 20000)]
    obx = [ed(i + 1, b"", text=c, sub_id="1") for i, c in enumerate(chunks)]
    assert len(obx) > 2
    assert read(message(msh(), pid(), *obx)).document == CDA_S1


def test_base64_continued_with_data_only_obx() -> None:
    head, tail = B64[:30000], B64[30000:]
    obx = [ed(1, b"", text=head, sub_id="1"), f"OBX|2|ED|11490-0^Lettre de liaison a la sortie^LN|1|{tail}||||||F"]
    assert read(message(msh(), pid(), *obx)).document == CDA_S1


def test_each_chunk_encoded_on_its_own() -> None:
    cut = len(CDA_S1) // 3 + 1  # not a multiple of 3: the first chunk ends with padding
    parts = [base64.b64encode(CDA_S1[:cut]).decode(), base64.b64encode(CDA_S1[cut:]).decode()]
    assert parts[0].endswith("=")
    obx = [ed(i + 1, b"", text=p, sub_id="1") for i, p in enumerate(parts)]
    assert read(message(msh(), pid(), *obx)).document == CDA_S1


@pytest.mark.parametrize("wrap", ["\r", "\n", "\r\n", "\\X0D0A\\", "\\.br\\"])
def test_line_wrapped_base64(wrap: str) -> None:
    wrapped = wrap.join(B64[i : i + 76] for i in range(0, len(B64), 76))
    letter = read(message(msh(), pid(), ed(1, b"", text=wrapped), "NTE|1||wrapped at 76"))
    assert letter.document == CDA_S1


def test_missing_padding_is_completed_but_a_broken_length_is_refused() -> None:
    assert read(message(msh(), pid(), ed(1, b"", text=B64.rstrip("=")))).document == CDA_S1
    answer = refused(message(msh(), pid(), ed(1, b"", text=B64.rstrip("=") + "AA")))
    assert (answer.code, answer.condition) == ("AE", "102")


# -- what is the letter ---------------------------------------------------------------------------------
def test_oru_with_pdf_and_cda_takes_the_cda() -> None:
    raw = message(
        msh("ORU^R01^ORU_R01"),
        pid(),
        "OBR|1||DOC|11490-0^Lettre^LN",
        ed(1, PDF, kind="Application", subtype="PDF", ident="PDF^Lettre PDF^L"),
        ed(2, CDA_S1, ident="CDA^Lettre CDA^L"),
        "OBX|3|TX|COMMENT^Commentaire^L||Lettre relue par le Dr X||||||F",
    )
    letter = read(raw)
    assert letter.document == CDA_S1 and letter.dropped == ("PDF",)


def test_pdf_alone_is_refused_never_guessed() -> None:
    answer = refused(message(msh("ORU^R01^ORU_R01"), pid(), ed(1, PDF, kind="Application", subtype="PDF")))
    assert (answer.code, answer.condition) == ("AE", "101") and "PDF" in answer.text


def test_reference_only_is_refused() -> None:
    raw = message(msh(), pid(), "OBX|1|RP|11490-0^Lettre^LN||https://dpi.chu.fr/doc/1^DPI^TEXT^XML||||||F")
    answer = refused(raw)
    assert (answer.code, answer.condition) == ("AE", "101") and "reference" in answer.text


def test_no_content_at_all_is_refused() -> None:
    answer = refused(message(msh(), pid(), "OBX|1|TX|COMMENT^^L||just a comment||||||F"))
    assert (answer.code, answer.condition) == ("AE", "101")


def test_two_different_cdas_are_refused_the_same_twice_is_fine() -> None:
    other = CDA_S1.replace(b"<title>", b"<title>Copie ", 1)
    assert other != CDA_S1
    answer = refused(message(msh(), pid(), ed(1, CDA_S1, ident="A^^L"), ed(2, other, ident="B^^L")))
    assert (answer.code, answer.location) == ("AE", "OBX^2^5")
    assert read(message(msh(), pid(), ed(1, CDA_S1, ident="A^^L"), ed(2, CDA_S1, ident="B^^L"))).document == CDA_S1


def test_declared_xml_that_is_not_xml() -> None:
    answer = refused(message(msh(), pid(), ed(1, b"plain words, not XML")))
    assert (answer.code, answer.location) == ("AE", "OBX^1^5^1^5")


def test_cda_inside_a_mime_package() -> None:
    package = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=XX\r\n\r\n--XX\r\n"
        b"Content-Type: application/hl7-cda+xml\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(CDA_S1)
        + b"\r\n--XX--\r\n"
    )
    raw = message(msh(), pid(), ed(1, package, kind="multipart", subtype="x-hl7-cda-level-one"))
    assert read(raw).document == CDA_S1


def test_size_limit_on_the_document() -> None:
    with pytest.raises(TooLarge):
        read(mdm(), max_bytes=len(CDA_S1) - 1)
    assert read(mdm(), max_bytes=len(CDA_S1)).document == CDA_S1
    assert hl7v2.answer_for(TooLarge("big")).condition == "104"


def test_continuation_pointer_is_refused() -> None:
    answer = refused(message(msh(), pid(), ed(1, CDA_S1), "DSC|CONT-0001|F"))
    assert answer.code == "AE" and "DSC" in answer.text


# -- character sets -------------------------------------------------------------------------------------
def test_latin1_declared() -> None:
    raw = message(
        msh(charset="8859/1"), "PID|1||IPP1^^^CHU&1.2.3&ISO^PI||HÉLÈNE^Zoé", ed(1, CDA_S1), encoding="latin-1"
    )
    assert read(raw).document == CDA_S1


@pytest.mark.parametrize("charset", ["UNICODE UTF-8", "", "ASCII"])
def test_bytes_that_do_not_fit_the_charset_are_refused_clearly(charset: str) -> None:
    raw = message(msh(charset=charset), "PID|1||IPP1^^^CHU&1.2.3&ISO^PI||HÉLÈNE", ed(1, CDA_S1), encoding="latin-1")
    with pytest.raises(EncodingError) as caught:
        read(raw)
    assert "MSH-18" in caught.value.message and "segment 2" in caught.value.message
    assert hl7v2.answer_for(caught.value).code == "AE"


def test_unsupported_charset_is_ar() -> None:
    with pytest.raises(UnsupportedMessage):
        read(mdm(charset="UNICODE UTF-16"))
    answer = refused(mdm(charset="UNICODE UTF-16"))
    assert (answer.code, answer.condition, answer.location) == ("AR", "103", "MSH^1^18")


# -- the header: AR ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "condition"),
    [
        (message(msh("ADT^A01^ADT_A01"), pid()), "200"),
        (message(msh("MDM^T01^MDM_T01"), pid()), "201"),
        (mdm(version="2.2"), "203"),
        (mdm(processing="T"), "202"),
        (mdm(processing="D"), "202"),
        (message(msh(control=""), pid(), ed(1, CDA_S1)), "101"),
        (message(msh(kind=""), pid(), ed(1, CDA_S1)), "101"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "100"),
        (b"MSH|", "100"),
        (b"MSHA^~\\&|x", "102"),
        (b"MSH|^^^^|DPI", "102"),
        (mdm(control="ONE") + mdm(control="TWO"), "100"),
    ],
)
def test_what_is_not_taken_is_ar(raw: bytes, condition: str) -> None:
    answer = refused(raw)
    assert (answer.code, answer.condition) == ("AR", condition)


def test_training_messages_when_allowed() -> None:
    assert read(mdm(processing="T"), processing_ids=("P", "T")).document == CDA_S1


@pytest.mark.parametrize("event", ["T02", "T04", "T06", "T08", "T10"])
def test_mdm_events_with_content(event: str) -> None:
    assert read(message(msh(f"MDM^{event}^MDM_T02"), pid(), ed(1, CDA_S1))).header.trigger == event


# -- PID-3 against the CDA --------------------------------------------------------------------------------
CDA_IDS = [("urn:oid:1.2.250.1.213.1.4.10", "244037511305285"), ("urn:oid:1.2.250.1.213.1.1.9.1.1", "IPP0004527891")]


def test_same_patient() -> None:
    ids = read(message(msh(), pid(*S1_PID), ed(1, CDA_S1))).patient_ids
    hl7v2.check_patient(ids, CDA_IDS)
    hl7v2.check_patient([PatientId("IPP0004527891")], CDA_IDS)  # no authority: the value matches
    hl7v2.check_patient([], CDA_IDS)  # nothing to compare: the CDA's identity stands alone
    hl7v2.check_patient(ids, [])


def test_other_value_under_the_same_authority_is_a_mismatch() -> None:
    with pytest.raises(PatientMismatch) as caught:
        hl7v2.check_patient([PatientId("IPP0000000001", "CHU", "1.2.250.1.213.1.1.9.1.1")], CDA_IDS)
    assert hl7v2.answer_for(caught.value) == Answer("AE", caught.value.message, "204", "PID^1^3")
    assert "IPP0000000001" not in caught.value.message  # no identifier in what is logged and audited


def test_nothing_in_common_is_refused_not_guessed() -> None:
    with pytest.raises(PatientMismatch):
        hl7v2.check_patient([PatientId("123", "OTHER", "9.9.9")], CDA_IDS)


def test_system_mapping_is_used() -> None:
    hl7v2.check_patient(
        [PatientId("987", "", "2.16.840.1.113883.4.1")],
        [("http://hl7.org/fhir/sid/us-ssn", "987")],
        lambda oid: "http://hl7.org/fhir/sid/us-ssn" if oid == "2.16.840.1.113883.4.1" else None,
    )
    with pytest.raises(PatientMismatch):
        hl7v2.check_patient(
            [PatientId("988", "", "2.16.840.1.113883.4.1")],
            [("http://hl7.org/fhir/sid/us-ssn", "987")],
            lambda oid: "http://hl7.org/fhir/sid/us-ssn",
        )


# -- answers and the ACK ------------------------------------------------------------------------------------
def test_gateway_errors_map_to_ae() -> None:
    assert hl7v2.answer_for(MissingIdentity("no patient")).condition == "101"
    assert hl7v2.answer_for(UnsafeInput("DTD")).code == "AE"
    internal = hl7v2.answer_for(RuntimeError("db down"))
    assert (internal.code, internal.condition, internal.retry) == ("AR", "207", True)
    assert "db down" not in internal.text


def test_ack_swaps_sender_and_receiver_and_echoes() -> None:
    header = hl7v2.read_header(mdm(control="CTRL-42", charset="8859/1"))
    now = datetime(2026, 11, 5, 9, 30, tzinfo=UTC)
    ack = hl7v2.build_ack(header, Answer("AE", "bad | thing ^ here", "102", "OBX^1^5"), now=now)
    segments = ack.split(b"\r")
    assert segments[0].startswith(b"MSH|^~\\&|GATEWAY|GW|DPI|CHU-PARIS|20261105093000+0000||ACK^T02^ACK|")
    assert segments[0].endswith(b"|P|2.5||||||8859/1")
    parsed = parse_message(ack.decode("latin-1"), find_groups=False)
    assert parsed.msa.msa_1.to_er7() == "AE" and parsed.msa.msa_2.to_er7() == "CTRL-42"
    err = parsed.err
    assert err.err_2.to_er7() == "OBX^1^5"
    assert err.err_3.to_er7() == "102^Data type error^HL70357"
    assert err.err_4.to_er7() == "E"
    assert err.err_8.to_er7() == "bad \\F\\ thing \\S\\ here Do not resend unchanged."
    assert parsed.msh.msh_10.to_er7() != "CTRL-42"


def test_ack_to_an_unreadable_message() -> None:
    ack = hl7v2.build_ack(None, Answer("AR", "not HL7", "100"))
    parsed = parse_message(ack.decode(), find_groups=False)
    assert parsed.msa.msa_1.to_er7() == "AR" and parsed.msh.msh_9.to_er7() == "ACK"


def test_ack_control_ids_are_new_each_time() -> None:
    header = hl7v2.read_header(mdm())
    ids = {hl7v2.build_ack(header, Answer("AA", "ok")).split(b"|")[9] for _ in range(20)}
    assert len(ids) == 20
