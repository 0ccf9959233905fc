"""Fuzzing the HL7 v2 way in: generated MDM/ORU/other messages, valid-ish and mutated.

Two properties.  The parser and the ACK builder alone: every message is read or refused with a
:class:`GatewayError` (never another exception), and the answer is an ACK that an independent parser
(hl7apy) reads, with MSA-1 AA/AE/AR and the original control id.  Through the listener's message
handler with a real SQLite store: never an internal error (AR 207), an AA names a stored letter, and a
refusal stores nothing but its audit record.  Bounded and derandomized; the counts are printed at the
end of the run (``tests/fuzz/counts.py``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hl7apy.parser import parse_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.ingest import hl7v2
from gateway.intake import Intake
from gateway.mllp import MllpListener
from tests.conftest import FIXTURES, mappings
from tests.fuzz import counts
from tests.fuzz.strategies import cda_documents
from tests.fuzz.world import World, world
from tests.hl7v2_messages import CDA_S1, PDF, S1_PID

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

NOW = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
PARSER_EXAMPLES = 300
LISTENER_EXAMPLES = 150
FUZZ = settings(
    max_examples=PARSER_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)
DELIMITERS = [("|", "^", "~", "\\", "&"), ("!", "#", "*", "$", "%"), ("|", "^", "~", "\\", "&#")]
CDA_S8 = (FIXTURES / "cda" / "ldl-ses-s8-2020.xml").read_bytes()
XXE = (FIXTURES / "cda" / "bad" / "xxe-file.xml").read_bytes()
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


def _hl7_escape(text: str, d: tuple[str, ...]) -> str:
    fs, comp, rep, esc, sub = d[0], d[1], d[2], d[3], d[4][0]
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((fs, "F"), (comp, "S"), (sub, "T"), (rep, "R")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out


@st.composite
def _document(draw: st.DrawFn) -> bytes:
    return draw(
        st.one_of(
            st.sampled_from([CDA_S1, CDA_S1, CDA_S8, XXE, PDF, b"", b"<not-a-cda/>"]),
            cda_documents(),
            st.binary(max_size=200),
        )
    )


def _pick(draw: st.DrawFn, good: list[str], bad: list[str]) -> str:
    """Mostly a value the gateway takes (so most cases reach the content), sometimes one it refuses."""
    if draw(st.integers(0, 9)) == 9:  # hypothesis leans to small integers: 0 is the common, good case
        return draw(st.sampled_from(bad) | _TEXT)
    return draw(st.sampled_from(good))


@st.composite
def hl7v2_messages(draw: st.DrawFn) -> bytes:
    """An HL7 v2 message: a plausible header and body, then perhaps mutated at the byte level."""
    d = draw(st.sampled_from(DELIMITERS))
    fs, comp, rep = d[0], d[1], d[2]
    kind = _pick(draw, ["MDM^T02^MDM_T02", "MDM^T10", "ORU^R01^ORU_R01"], ["ADT^A01^ADT_A01", "MDM^T01", "", "ACK"])
    kind = kind.replace("^", comp)
    version = _pick(draw, ["2.5", "2.3", "2.5.1", "2.8.2"], ["2.2", "", "3.0"])
    processing = _pick(draw, ["P"], ["T", "", "X"])
    charset = _pick(draw, ["UNICODE UTF-8", "", "8859/1", "8859/15"], ["ASCII", "UNICODE UTF-16", "EBCDIC"])
    control = _pick(draw, [draw(st.text(alphabet="ABCDEF0123456789-", min_size=1, max_size=20))], [""])
    codec = hl7v2.CHARSETS.get(charset, "utf-8")
    segments = [
        f"MSH{fs}{''.join(d[1:])}{fs}DPI{fs}CHU-PARIS{fs}GATEWAY{fs}GW{fs}20261105{fs}{fs}{kind}{fs}{control}"
        f"{fs}{processing}{fs}{version}{fs}{fs}{fs}{fs}{fs}FRA{fs}{charset}",
        f"EVN{fs}T02{fs}20261105",
    ]
    ids = draw(
        st.sampled_from(
            [list(S1_PID), [S1_PID[0]], ["IPP0009999999^^^CHU&1.2.250.1.213.1.1.9.1.1&ISO^PI"], [], ["X^^^&&"]]
        )
    )
    name = draw(st.sampled_from(["DUPONT^MARIE", "HÉLÈNE^Zoé", "O'BRIEN^J\\E\\"]) | _TEXT)
    if draw(st.booleans()) or ids:
        pid = rep.join(i.replace("^", comp) for i in ids)
        segments.append(f"PID{fs}1{fs}{fs}{pid}{fs}{fs}{_hl7_escape(name, d)}")
    layout = draw(st.sampled_from(["ed", "split", "wrapped", "tx", "rp", "pdf+cda", "bad-b64", "hex", "none"]))
    doc = draw(_document())
    b64 = base64.b64encode(doc).decode()
    ed = f"{comp}TEXT{comp}XML{comp}Base64{comp}"
    if layout == "ed":
        segments.append(f"OBX{fs}1{fs}ED{fs}DOC{fs}{fs}{ed}{b64}")
    elif layout == "split":
        size = draw(st.integers(1, 40000))
        for i in range(0, len(b64) or 1, size):
            segments.append(f"OBX{fs}{i // size + 1}{fs}ED{fs}DOC{fs}1{fs}{ed}{b64[i : i + size]}")
    elif layout == "wrapped":
        segments.append(
            f"OBX{fs}1{fs}ED{fs}DOC{fs}{fs}{ed}" + "\r".join(b64[i : i + 76] for i in range(0, len(b64), 76))
        )
    elif layout == "tx":
        for i, line in enumerate(doc.decode("utf-8", "replace").split("\n")[:400]):
            segments.append(f"OBX{fs}{i + 1}{fs}TX{fs}DOC{fs}1{fs}{_hl7_escape(line, d)}")
    elif layout == "rp":
        segments.append(f"OBX{fs}1{fs}RP{fs}DOC{fs}{fs}https://dpi/doc/1{comp}DPI{comp}TEXT{comp}XML")
    elif layout == "pdf+cda":
        pdf = base64.b64encode(PDF).decode()
        segments.append(f"OBX{fs}1{fs}ED{fs}PDF{fs}{fs}{comp}Application{comp}PDF{comp}Base64{comp}{pdf}")
        segments.append(f"OBX{fs}2{fs}ED{fs}CDA{fs}{fs}{ed}{b64}")
    elif layout == "bad-b64":
        segments.append(f"OBX{fs}1{fs}ED{fs}DOC{fs}{fs}{ed}{b64[: len(b64) // 2]}!*{b64[len(b64) // 2 :]}")
    elif layout == "hex":
        segments.append(f"OBX{fs}1{fs}ED{fs}DOC{fs}{fs}{comp}TEXT{comp}XML{comp}Hex{comp}{doc.hex()}")
    sep = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    raw = (sep.join(segments) + sep).encode(codec if codec != "ascii" else "utf-8", "replace")
    return draw(_mutated(raw))


@st.composite
def _mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "splice", "drop", "dup", "byte", "escape"]))
    if how == "none" or not raw:
        return raw
    at = len(raw) - 1 - draw(st.integers(0, len(raw) - 1))  # from the end: the MSH survives most cuts
    if how == "truncate":
        return raw[:at]
    if how == "splice":
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if how == "byte":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if how == "escape":
        return raw[:at] + draw(st.sampled_from([b"\\", b"\\X", b"\\XZZ\\", b"\\.br", b"\\F", b"\\Cxx\\"])) + raw[at:]
    lines = re.split(rb"(\r\n|\r|\n)", raw)
    index = draw(st.integers(0, len(lines) - 1))
    if how == "drop":
        return b"".join(lines[:index] + lines[index + 1 :])
    return b"".join(lines[: index + 1] + lines[index:])


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cases = 0
        self.answers = {"AA": 0, "AE": 0, "AR": 0}

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc: object) -> None:
        crashes = 0 if exc[0] is None else 1
        counts.record(self.name, self.cases, crashes=crashes, **{k.lower(): v for k, v in self.answers.items()})


def _check_ack(ack: bytes, header: hl7v2.Header | None) -> str:
    """The ACK reads with hl7apy; MSA-1 is AA/AE/AR and MSA-2 the original control id; its code."""
    charset = header.charset.upper() if header else ""
    codec = hl7v2.CHARSETS[charset] if charset in hl7v2.CHARSETS and charset else "ascii"
    parsed = parse_message(ack.decode(codec), find_groups=False)
    code = str(parsed.msa.msa_1.to_er7())
    assert code in ("AA", "AE", "AR"), ack
    assert str(parsed.msh.msh_9.to_er7()).startswith("ACK"), ack
    if header is not None and re.fullmatch(r"[\w.-]{1,199}", header.control_id, re.ASCII):
        assert str(parsed.msa.msa_2.to_er7()) == header.control_id, ack
    if code != "AA":
        assert [s for s in parsed.children if s.name == "ERR"], ack
    return code


def test_parser_and_ack_never_crash() -> None:
    with Tally("hl7v2-parse") as tally:

        @FUZZ
        @given(hl7v2_messages())
        def run(raw: bytes) -> None:
            tally.cases += 1
            header: hl7v2.Header | None = None
            try:
                header = hl7v2.read_header(raw)
                letter = hl7v2.read_message(raw, max_bytes=1 << 20)
                answer = hl7v2.Answer("AA", "letter stored")
                assert letter.document
            except GatewayError as error:
                answer = hl7v2.answer_for(error)
                assert answer.code in ("AE", "AR") and answer.condition and answer.text
            tally.answers[_check_ack(hl7v2.build_ack(header, answer, now=NOW), header)] += 1

        run()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(tmp_path_factory.mktemp("fuzz-mllp")) as w:
        yield w


def test_listener_stores_all_or_nothing(service: World) -> None:
    listener = MllpListener(Intake(service.settings, service.store, service.outbox, mappings()))
    with Tally("hl7v2-mllp") as tally:

        @settings(FUZZ, max_examples=LISTENER_EXAMPLES)
        @given(hl7v2_messages())
        def run(raw: bytes) -> None:
            tally.cases += 1
            before = service.rows()
            ack = listener.handle(raw, NOW)
            after = service.rows()
            try:
                header: hl7v2.Header | None = hl7v2.read_header(raw)
            except GatewayError:
                header = None
            code = _check_ack(ack, header)
            tally.answers[code] += 1
            assert b"|207^" not in ack, f"internal error on {raw[:200]!r}: {ack!r}"
            if code == "AA":
                letter_id = ack.split(b"MSA|AA|")[1].split(b"|")[1].split()[1].decode()
                assert service.outbox.letter(letter_id) is not None
                assert after["letter"] - before["letter"] in (0, 1)
            else:
                assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"]), (before, after)
                assert after["audit_event"] == before["audit_event"] + 1, (before, after)

        run()
    listener.close()
    assert tally.answers["AA"] and tally.answers["AE"] and tally.answers["AR"], tally.answers
