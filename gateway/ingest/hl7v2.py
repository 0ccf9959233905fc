"""HL7 v2 intake: an MDM (T02/T04/T06/T08/T10) or ORU^R01 message in, the CDA letter it carries out.

Hospital systems that cannot POST a letter send it as HL7 v2 over MLLP, the CDA inside an OBX segment
(value type ED, base64).  This module reads such a message the way real senders write it — any of
``\\r``, ``\\n`` or ``\\r\\n`` between segments, the delimiters of MSH-1/MSH-2, escape sequences, the
MSH-18 character set, the document split over several OBX segments or wrapped over several lines —
and refuses the rest with a reason the sender can act on.  It never guesses: a PDF without its CDA,
two different CDAs, a PID-3 that contradicts the CDA's patient are refused, not picked from.

Every refusal is a :class:`Hl7Refusal` (an :class:`~gateway.errors.IngestError`) that also knows its
HL7 answer: the acknowledgement code (AE: the content is wrong, do not resend it as is; AR: the
message was not processed — unsupported type, version or processing id, unreadable MSH, or a fault on
our side), the table 0357 condition code and the error location.  :func:`build_ack` writes the ACK.
The module is pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from gateway.errors import (
    EncodingError,
    GatewayError,
    IngestError,
    MappingError,
    MissingIdentity,
    PriorMismatch,
    ProfileViolation,
    SenderNotAllowed,
    TooLarge,
    UnsafeInput,
    UnsupportedDocument,
    Where,
)

__all__ = [
    "CONTENT_EVENTS",
    "VERSIONS",
    "Answer",
    "Header",
    "Hl7Letter",
    "Hl7Refusal",
    "PatientId",
    "PatientMismatch",
    "UnsupportedMessage",
    "answer_for",
    "build_ack",
    "check_patient",
    "read_header",
    "read_message",
]

VERSIONS = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9"})
# MDM events that carry the document's content (T01/T03/T05/T07/T09/T11 are notifications only)
CONTENT_EVENTS = {"MDM": frozenset({"T02", "T04", "T06", "T08", "T10"}), "ORU": frozenset({"R01"})}
# MSH-18 (table 0211) → Python codec; empty MSH-18 reads as UTF-8 (ASCII is a subset), strictly
CHARSETS = {
    "": "utf-8",
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
_XML_SUBTYPES = {"XML", "X-HL7-CDA-LEVEL-ONE", "X-HL7-CDA-LEVEL-TWO", "HL7-CDA", "CDA", "HL7-CDA+XML", "CDA+XML"}
_PDF_SUBTYPES = {"PDF", "X-PDF"}
_SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}")
_FORMATTING = {".br": "\n", ".sp": "\n", ".fi": "", ".nf": "", ".ce": "\n", "H": "", "N": ""}
_B64_SPACE = re.compile(rb"[\s]+")
_XML_ENCODING = re.compile(r"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


# -- refusals ---------------------------------------------------------------------------------------
class Hl7Refusal(IngestError):
    """A message refused with its HL7 answer: ``ack`` AE/AR, table 0357 ``condition``, ERR-2 ``location``."""

    default_ack: ClassVar[str] = "AE"
    default_condition: ClassVar[str] = "102"

    def __init__(
        self, message: str, *, ack: str | None = None, condition: str | None = None, location: str = ""
    ) -> None:
        super().__init__(message, where=Where(source="hl7v2", path=location))
        self.ack = ack or self.default_ack
        self.condition = condition or self.default_condition
        self.location = location


class UnsupportedMessage(Hl7Refusal):
    """A message type, event, version, processing id or character set this gateway does not take (AR)."""

    issue_code = "not-supported"
    default_ack = "AR"
    default_condition = "200"


class PatientMismatch(Hl7Refusal):
    """PID-3 names another patient than the CDA: refused, never settled by picking one."""

    issue_code = "business-rule"
    default_condition = "204"


# -- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    """What the ACK needs from MSH (parsed, unescaped); filled as far as the MSH could be read."""

    sending_application: tuple[str, ...] = ()
    sending_facility: tuple[str, ...] = ()
    receiving_application: tuple[str, ...] = ()
    receiving_facility: tuple[str, ...] = ()
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    charset: str = ""

    @property
    def sender(self) -> str:
        """``application@facility`` (namespace or universal id of MSH-3 and MSH-4): the audited client."""

        def name(hd: tuple[str, ...]) -> str:
            text = next((c for c in hd if c), "?")
            return "".join(ch for ch in text if ch.isprintable())[:60]

        return f"{name(self.sending_application)}@{name(self.sending_facility)}"

    @property
    def facility(self) -> str:
        return next((c for c in self.sending_facility if c), "")


@dataclass(frozen=True, slots=True)
class PatientId:
    """One PID-3 repetition (CX): value, assigning authority namespace and OID (CX-4), type (CX-5)."""

    value: str
    namespace: str = ""
    oid: str = ""
    type_code: str = ""


@dataclass(frozen=True, slots=True)
class Hl7Letter:
    """The letter found in a message: the CDA bytes, and PID-3 to check it against."""

    header: Header
    document: bytes
    patient_ids: tuple[PatientId, ...]
    dropped: tuple[str, ...] = field(default=())  # what else the message carried (e.g. "PDF"), not used


@dataclass(frozen=True, slots=True)
class _Syntax:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    def split(self, value: str, sep: str) -> list[str]:
        return value.split(sep) if sep else [value]

    def unescape(self, value: str, codec: str) -> str:
        """Escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\ ...); unknown ones are kept as written."""
        esc = self.escape
        if not esc or esc not in value:
            return value
        out: list[str] = []
        i = 0
        while i < len(value):
            ch = value[i]
            end = value.find(esc, i + 1) if ch == esc else -1
            if end < 0:
                out.append(ch)
                i += 1
                continue
            seq = value[i + 1 : end]
            simple = {"F": self.field, "S": self.component, "T": self.subcomponent, "R": self.repetition, "E": esc}
            if seq in simple:
                out.append(simple[seq])
            elif seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1:
                try:
                    out.append(bytes.fromhex(seq[1:]).decode(codec))
                except (ValueError, UnicodeDecodeError):
                    out.append(value[i : end + 1])
            elif seq in _FORMATTING or seq[:3] in (".in", ".ti", ".sk") or seq[:1] in ("C", "M", "Z"):
                out.append(_FORMATTING.get(seq, ""))
            else:
                out.append(value[i : end + 1])
            i = end + 1
        return "".join(out)


@dataclass(frozen=True, slots=True)
class _Segment:
    name: str
    fields: list[str]  # fields[n] is field n (for MSH too: fields[1] is MSH-1)
    index: int  # 1-based position among segments of this name

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


def _msh_line(raw: bytes) -> tuple[bytes, bytes]:
    """The MSH line and the rest, split on any of CR, LF, CRLF; refuses what does not start with MSH."""
    body = raw.lstrip(b"\xef\xbb\xbf\r\n\t \x0b")
    if not body.startswith(b"MSH") or len(body) < 8:
        raise Hl7Refusal(
            "not an HL7 v2 message: it must start with an MSH segment", ack="AR", condition="100", location="MSH^1"
        )
    end = len(body)
    for sep in (b"\r", b"\n"):
        pos = body.find(sep)
        if 0 <= pos < end:
            end = pos
    return body[:end], body


def _syntax(msh: bytes) -> _Syntax:
    fs = chr(msh[3])
    if fs.isalnum() or fs in " \t\r\n\x0b\x1c" or msh[3] > 0x7E:
        raise Hl7Refusal(f"MSH-1 field separator {fs!r} is not usable", ack="AR", condition="102", location="MSH^1^1")
    end = msh.find(msh[3:4], 4)
    chars = (msh[4:end] if end >= 0 else msh[4:]).decode("latin-1")
    bad = len(chars) < 4 or len(chars) > 5 or len(set(chars + fs)) != len(chars) + 1
    if bad or any(c.isalnum() or c.isspace() or ord(c) > 0x7E for c in chars):
        raise Hl7Refusal(
            "MSH-2 encoding characters must be 4 distinct symbols (e.g. ^~\\&)",
            ack="AR",
            condition="102",
            location="MSH^1^2",
        )
    return _Syntax(fs, chars[0], chars[1], chars[2], chars[3])


def _codec(charset: str) -> str:
    codec = CHARSETS.get(charset.strip().upper())
    if codec is None:
        raise UnsupportedMessage(
            f"MSH-18 character set {charset[:40]!r} is not supported: use UNICODE UTF-8, 8859/n or ASCII",
            condition="103",
            location="MSH^1^18",
        )
    return codec


def _fields(line: str, syntax: _Syntax, msh: bool) -> list[str]:
    parts = line.split(syntax.field)
    # MSH-1 is the separator itself: shift so fields[n] is MSH-n
    return [parts[0], syntax.field, *parts[1:]] if msh else parts


def read_header(raw: bytes) -> Header:
    """MSH as far as it reads (for the ACK); raises :class:`Hl7Refusal` (AR) when MSH is unreadable."""
    msh, _ = _msh_line(raw)
    syntax = _syntax(msh)
    fields = _fields(msh.decode("latin-1"), syntax, msh=True)
    charset = syntax.split(fields[18] if len(fields) > 18 else "", syntax.repetition)[0]
    try:
        codec = _codec(charset)
        text = msh.decode(codec)
    except (UnsupportedMessage, UnicodeDecodeError):
        codec, text = "latin-1", msh.decode("latin-1")  # only to echo MSH in the refusal's ACK
    fields = _fields(text, syntax, msh=True)

    def part(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    def comps(n: int) -> tuple[str, ...]:
        first = syntax.split(part(n), syntax.repetition)[0]
        return tuple(syntax.unescape(c, codec) for c in syntax.split(first, syntax.component))

    kind = comps(9)
    return Header(
        sending_application=comps(3),
        sending_facility=comps(4),
        receiving_application=comps(5),
        receiving_facility=comps(6),
        message_type=kind[0].strip().upper() if kind else "",
        trigger=kind[1].strip().upper() if len(kind) > 1 else "",
        control_id=comps(10)[0].strip() if comps(10) else "",
        processing_id=comps(11)[0].strip().upper() if comps(11) else "",
        version=comps(12)[0].strip() if comps(12) else "",
        charset=charset.strip(),
    )


def _check_header(header: Header, processing_ids: frozenset[str]) -> None:
    if not header.message_type:
        raise Hl7Refusal("MSH-9 message type is missing", ack="AR", condition="101", location="MSH^1^9")
    if not header.control_id:
        raise Hl7Refusal("MSH-10 message control id is missing", ack="AR", condition="101", location="MSH^1^10")
    events = CONTENT_EVENTS.get(header.message_type)
    kind = f"{header.message_type}^{header.trigger}"
    if events is None:
        raise UnsupportedMessage(
            f"message type {kind[:20]} is not taken here: send MDM^T02 or ORU^R01 carrying the CDA letter",
            condition="200",
            location="MSH^1^9^1^1",
        )
    if header.trigger not in events:
        raise UnsupportedMessage(
            f"event {kind[:20]} carries no document content here: send MDM^T02 (or T04/T06/T08/T10) or ORU^R01",
            condition="201",
            location="MSH^1^9^1^2",
        )
    if header.version not in VERSIONS:
        raise UnsupportedMessage(
            f"HL7 version {header.version[:12] or '(none)'!r} is not supported: 2.3 to 2.9",
            condition="203",
            location="MSH^1^12",
        )
    if header.processing_id not in processing_ids:
        raise UnsupportedMessage(
            f"processing id {header.processing_id[:3] or '(none)'!r} is not accepted here "
            f"(this listener takes {'/'.join(sorted(processing_ids))})",
            condition="202",
            location="MSH^1^11",
        )


def _segments(text: str, syntax: _Syntax) -> list[_Segment]:
    """Segments split on CR, LF or CRLF; a line that is not a segment continues the previous one
    (a wrapped base64 or text value), joined with a line feed."""
    lines: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if _SEGMENT.match(line) and (len(line) == 3 or line[3] == syntax.field):
            lines.append(line)
        elif line.strip() and lines:
            lines[-1] += "\n" + line
        elif line.strip():
            raise Hl7Refusal("text before the MSH segment", location="MSH^1", condition="100")
    counts: dict[str, int] = {}
    out = []
    for line in lines:
        name = line[:3]
        counts[name] = counts.get(name, 0) + 1
        out.append(_Segment(name, _fields(line, syntax, msh=name == "MSH"), counts[name]))
    return out


@dataclass(slots=True)
class _Part:
    """One observation value being assembled from one or more OBX segments."""

    value_type: str
    key: tuple[str, str]
    location: str
    meta: list[str]  # ED: source application, type of data, subtype, encoding
    data: list[str]


def _observations(segments: list[_Segment], syntax: _Syntax, codec: str) -> list[_Part]:
    """OBX values grouped: consecutive OBX with the same OBX-3 identifier and OBX-4 sub-id are one value
    (a document split over several segments); ED parts after the first may give the data alone."""
    parts: list[_Part] = []
    for seg in segments:
        if seg.name != "OBX":
            continue
        value_type = seg.get(2).strip().upper()
        ident = syntax.unescape(syntax.split(seg.get(3), syntax.component)[0], codec).strip()
        key = (ident, seg.get(4).strip())
        location = f"OBX^{seg.index}^5"
        reps = syntax.split(seg.get(5), syntax.repetition)
        previous = parts[-1] if parts else None
        same = previous is not None and previous.key == key and previous.value_type in (value_type, "")
        if value_type == "ED":
            meta: list[str] = []
            data: list[str] = []
            for rep in reps:
                comps = syntax.split(rep, syntax.component)
                if len(comps) >= 5:
                    meta = meta or [syntax.unescape(c, codec).strip() for c in comps[:4]]
                    data.append(syntax.component.join(comps[4:]))  # base64 has no ^, text may
                elif len(comps) == 1 and same:
                    data.append(comps[0])
                elif rep.strip():
                    raise Hl7Refusal(
                        "OBX-5 of type ED needs 5 components: source ^ type ^ subtype ^ encoding ^ data",
                        location=location,
                    )
            if same and previous is not None and (not meta or meta == previous.meta):
                previous.data.extend(data)
                continue
            parts.append(_Part(value_type, key, location, meta, data))
        else:
            texts = [syntax.unescape(rep, codec) for rep in reps]
            if same and previous is not None:
                previous.data.extend(texts)
                continue
            parts.append(_Part(value_type, key, location, [], texts))
    return parts


def _decode_ed(part: _Part, syntax: _Syntax, codec: str, max_bytes: int) -> bytes:
    encoding = part.meta[3].upper() if len(part.meta) > 3 else ""
    text = "".join(part.data)
    if encoding in ("BASE64", "B64"):
        compact = _B64_SPACE.sub(b"", syntax.unescape(text, codec).encode("latin-1", "replace"))
        if len(compact) // 4 * 3 - 2 > max_bytes:  # before decoding: at most 2 bytes of padding
            raise TooLarge(f"document over the {max_bytes}-byte limit", where=Where(source="hl7v2", path=part.location))
        try:
            return _b64(compact)
        except (binascii.Error, ValueError):
            pass
        try:  # some senders encode each OBX chunk on its own (padding in the middle)
            chunks = [_B64_SPACE.sub(b"", syntax.unescape(d, codec).encode("latin-1", "replace")) for d in part.data]
            if len(chunks) > 1:
                return b"".join(_b64(c) for c in chunks)
        except (binascii.Error, ValueError):
            pass
        raise Hl7Refusal("OBX-5 data is not valid base64 (OBX-5.4 says Base64)", location=part.location + "^1^5")
    if encoding == "HEX":
        try:
            return bytes.fromhex(re.sub(r"\s+", "", text))
        except ValueError:
            raise Hl7Refusal("OBX-5 data is not valid hex (OBX-5.4 says Hex)", location=part.location) from None
    if encoding in ("A", "ASCII", ""):
        return _text_bytes(syntax.unescape(text, codec), part.location)
    raise Hl7Refusal(
        f"OBX-5.4 encoding {encoding[:16]!r} is not supported: Base64, Hex or A",
        condition="103",
        location=part.location,
    )


def _b64(compact: bytes) -> bytes:
    """Strict base64, padding added when it is only missing (a length of 4n+1 stays invalid)."""
    if len(compact) % 4 != 1:
        compact += b"=" * (-len(compact) % 4)
    return base64.b64decode(compact, validate=True)


def _text_bytes(text: str, location: str) -> bytes:
    """Text (a CDA sent as TX/FT or ED encoding A) as bytes in the encoding its XML declaration names."""
    named = _XML_ENCODING.match(text)
    codec = named.group(1) if named else "utf-8"
    try:
        return text.encode(codec)
    except LookupError:
        raise EncodingError(
            f"unknown XML encoding {codec[:30]!r}", where=Where(source="hl7v2", path=location)
        ) from None
    except UnicodeEncodeError:
        raise EncodingError(
            f"the text does not fit the XML declaration's encoding {codec[:30]!r}",
            where=Where(source="hl7v2", path=location),
        ) from None


def _sniff(data: bytes) -> str:
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:5]
    if head.startswith(b"%PDF"):
        return "pdf"
    if head.startswith(b"<") or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "xml"
    return "other"


def _multipart_xml(data: bytes, location: str) -> list[bytes]:
    """The XML parts of a MIME multipart value (type of data ``multipart``)."""
    message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    if not message.is_multipart():
        raise Hl7Refusal("OBX-5 says multipart but the data is not a MIME multipart", location=location)
    found = []
    for sub in message.walk():
        payload = sub.get_payload(decode=True) if not sub.is_multipart() else None
        if isinstance(payload, bytes) and "xml" in sub.get_content_type():
            found.append(payload)
    return found


def read_message(
    raw: bytes,
    *,
    max_bytes: int,
    processing_ids: Iterable[str] = ("P",),
) -> Hl7Letter:
    """The CDA letter an MDM or ORU^R01 message carries, and PID-3; raises an :class:`IngestError`
    subclass (mostly :class:`Hl7Refusal`) naming what is wrong and where."""
    header = read_header(raw)
    _check_header(header, frozenset(p.upper() for p in processing_ids))
    codec = _codec(header.charset)
    _, body = _msh_line(raw)
    syntax = _syntax(body)
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        segment = body[: exc.start].replace(b"\r\n", b"\r").replace(b"\n", b"\r").count(b"\r") + 1
        declared = header.charset or "(none: UTF-8 assumed)"
        raise EncodingError(
            f"byte 0x{body[exc.start]:02X} in segment {segment} is not valid in the MSH-18 character set "
            f"{declared}: declare the right MSH-18 (e.g. 8859/1 or UNICODE UTF-8)",
            where=Where(source="hl7v2", path="MSH^1^18"),
        ) from None
    segments = _segments(text, syntax)
    if sum(s.name == "MSH" for s in segments) > 1:
        raise Hl7Refusal(
            "several messages in one frame (a batch?): send one message per MLLP frame", ack="AR", condition="100"
        )
    if any(s.name == "DSC" and s.get(1).strip() for s in segments):
        raise Hl7Refusal(
            "continued messages (DSC) are not taken: send the whole document in one message", condition="100"
        )
    patient_ids = _patient_ids(segments, syntax, codec)
    xml: list[tuple[bytes, str]] = []
    kinds: list[str] = []
    references = 0
    for part in _observations(segments, syntax, codec):
        if part.value_type == "RP":
            references += 1
            continue
        if part.value_type == "ED":
            subtype = part.meta[2].upper() if len(part.meta) > 2 else ""
            data_type = part.meta[1].upper() if len(part.meta) > 1 else ""
            data = _decode_ed(part, syntax, codec, max_bytes)
            sniffed = _sniff(data)
            multipart = data_type == "MULTIPART" or subtype.startswith("MULTIPART") or subtype in ("MIXED", "RELATED")
            if multipart and sniffed != "xml":  # a MIME package (CDA R1 style), unless the CDA is sent bare
                xml.extend((d, part.location) for d in _multipart_xml(data, part.location))
                kinds.append("multipart")
            elif subtype in _XML_SUBTYPES and sniffed != "xml":
                raise Hl7Refusal(
                    f"OBX-5 declares {subtype[:30]} but its data is not XML", location=part.location + "^1^5"
                )
            elif sniffed == "xml":
                xml.append((data, part.location))
            else:
                kinds.append("PDF" if sniffed == "pdf" or subtype in _PDF_SUBTYPES else subtype or "data")
        elif part.value_type in ("TX", "FT", "ST"):
            joined = "\n".join(part.data)
            if joined.lstrip("\ufeff \t\r\n").startswith("<"):
                xml.append((_text_bytes(joined.lstrip("\ufeff \t\r\n"), part.location), part.location))
    distinct = {data for data, _ in xml}
    if not distinct:
        if "PDF" in kinds:
            raise Hl7Refusal(
                "the message carries a PDF but no CDA: a PDF has no structured letter; send the CDA too (OBX ED, XML)",
                condition="101",
                location="OBX",
            )
        if references:
            raise Hl7Refusal(
                "the document is sent by reference (OBX RP) only: the gateway needs its content (OBX ED, base64 CDA)",
                condition="101",
                location="OBX",
            )
        raise Hl7Refusal(
            "no CDA document in the message: expected an OBX of value type ED carrying the base64 CDA",
            condition="101",
            location="OBX",
        )
    if len(distinct) > 1:
        raise Hl7Refusal(
            f"the message carries {len(distinct)} different XML documents: which one is the letter is not guessed",
            condition="100",
            location=xml[1][1],
        )
    document = xml[0][0]
    if len(document) > max_bytes:
        raise TooLarge(f"document over the {max_bytes}-byte limit", where=Where(source="hl7v2", path=xml[0][1]))
    return Hl7Letter(header, document, patient_ids, tuple(kinds))


def _patient_ids(segments: list[_Segment], syntax: _Syntax, codec: str) -> tuple[PatientId, ...]:
    pid = next((s for s in segments if s.name == "PID"), None)
    if pid is None:
        return ()
    out = []
    for rep in syntax.split(pid.get(3), syntax.repetition):
        comps = [syntax.unescape(c, codec) for c in syntax.split(rep, syntax.component)]
        value = comps[0].strip() if comps else ""
        if not value:
            continue
        authority = syntax.split(comps[3], syntax.subcomponent) if len(comps) > 3 else []
        authority = [syntax.unescape(a, codec).strip() for a in authority]
        out.append(
            PatientId(
                value,
                authority[0] if authority else "",
                authority[1] if len(authority) > 1 else "",
                comps[4].strip() if len(comps) > 4 else "",
            )
        )
    return tuple(out)


def check_patient(
    pid: Iterable[PatientId],
    cda: Iterable[tuple[str, str]],
    system_of: Callable[[str], str | None] = lambda oid: None,
) -> None:
    """PID-3 against the CDA's patient identifiers ``(system, value)``, where both are present.

    An identifier is comparable when its assigning authority OID (CX-4.2) names a system the CDA
    uses: any disagreement there is a mismatch.  With nothing comparable, one shared value is
    needed; with none the patient cannot be confirmed, and that is refused too.  ``system_of(oid)``
    maps an OID to the FHIR system the translation uses (default: ``urn:oid:<oid>``).
    """
    pid_ids = [p for p in pid if p.value]
    cda_ids = [(s, v) for s, v in cda if v]
    if not pid_ids or not cda_ids:
        return
    agreed = False
    for p in pid_ids:
        systems = {f"urn:oid:{p.oid}", p.oid, system_of(p.oid) or ""} - {"", "urn:oid:"} if p.oid else set()
        same_system = [v for s, v in cda_ids if s in systems]
        if same_system and p.value not in same_system:
            raise PatientMismatch(
                "PID-3 and the CDA's recordTarget name different patients (same assigning authority, other value)",
                location="PID^1^3",
            )
        agreed = agreed or bool(same_system) or any(v == p.value for _, v in cda_ids)
    if not agreed:
        raise PatientMismatch(
            "no PID-3 identifier matches the CDA's patient identifiers: the patient cannot be confirmed",
            location="PID^1^3",
        )


# -- answering ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Answer:
    """An acknowledgement to send: MSA-1 code, text, and for a refusal the ERR content."""

    code: str  # AA, AE, AR
    text: str
    condition: str = ""  # table 0357
    location: str = ""  # ERR-2, e.g. OBX^1^5
    retry: bool = False


_CONDITIONS = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


def answer_for(error: BaseException) -> Answer:
    """The HL7 answer to a refusal: AE when the content is wrong (resending it unchanged will not
    help), AR when the message was not processed (unsupported, or our fault: resend later)."""
    if isinstance(error, Hl7Refusal):
        return Answer(error.ack, error.message, error.condition, error.location)
    if not isinstance(error, GatewayError):
        return Answer("AR", "internal error: the message was not stored; resend it later", "207", retry=True)
    location = error.where.path
    if isinstance(error, TooLarge):
        return Answer("AE", error.message, "104", location)
    if isinstance(error, MissingIdentity):
        return Answer("AE", error.message, "101", location)
    if isinstance(error, UnsafeInput | EncodingError):
        return Answer("AE", error.message, "102", location)
    if isinstance(error, UnsupportedDocument | MappingError):
        return Answer("AE", error.message, "103", location)
    if isinstance(error, PriorMismatch):
        return Answer("AE", error.message, "204", location)
    if isinstance(error, SenderNotAllowed):  # not processed, and resending it unchanged will not help
        return Answer("AR", error.message, "103", location)
    if isinstance(error, IngestError | ProfileViolation):
        return Answer("AE", error.message, "102" if isinstance(error, IngestError) else "207", location)
    return Answer("AR", error.message, "207", location, retry=error.retryable)


def _escape(value: str, syntax: _Syntax) -> str:
    """Text for an ACK field: delimiters escaped, control characters dropped."""
    value = "".join(ch if ch.isprintable() else " " for ch in value)
    value = value.replace(syntax.escape, f"{syntax.escape}E{syntax.escape}")
    for char, code in (
        (syntax.field, "F"),
        (syntax.component, "S"),
        (syntax.repetition, "R"),
        (syntax.subcomponent, "T"),
    ):
        value = value.replace(char, f"{syntax.escape}{code}{syntax.escape}")
    return value


_ACK_SYNTAX = _Syntax("|", "^", "~", "\\", "&")


def build_ack(
    header: Header | None,
    answer: Answer,
    *,
    now: datetime | None = None,
    control_id: str | None = None,
    application: tuple[str, ...] = ("GATEWAY",),
) -> bytes:
    """The ACK for ``header``'s message: MSH with sender and receiver swapped, MSA (the original
    MSH-10), and ERR (2.5 style: location, table 0357 code, severity, user message) for a refusal.

    Encoded in the message's MSH-18 character set when supported, else ASCII (unmappable characters
    replaced); the ACK never carries patient data."""
    h = header or Header()
    moment = (now or datetime.now(UTC)).astimezone(UTC)

    def hd(value: tuple[str, ...]) -> str:
        return "^".join(_escape(v, _ACK_SYNTAX) for v in value)

    def text(value: str, limit: int) -> str:
        return _escape(" ".join(value.split())[:limit], _ACK_SYNTAX)

    trigger = _escape(h.trigger[:3], _ACK_SYNTAX)
    kind = f"ACK^{trigger}^ACK" if trigger else "ACK"
    charset = h.charset if h.charset.upper() in CHARSETS and h.charset else ""
    msh = [
        "MSH",
        "^~\\&",
        hd(h.receiving_application) or hd(application),
        hd(h.receiving_facility),
        hd(h.sending_application),
        hd(h.sending_facility),
        moment.strftime("%Y%m%d%H%M%S+0000"),
        "",
        kind,
        _escape(control_id or uuid.uuid4().hex[:20], _ACK_SYNTAX),
        text(h.processing_id, 3) or "P",
        h.version if h.version in VERSIONS | {"2.1", "2.2"} else "2.5",
    ]
    if charset:
        msh += ["", "", "", "", "", _escape(charset, _ACK_SYNTAX)]
    segments = ["|".join(msh), "|".join(["MSA", answer.code, text(h.control_id, 199), text(answer.text, 80)])]
    if answer.code != "AA":
        condition = answer.condition or "207"
        what = _CONDITIONS.get(condition, "")
        hint = " Resend later." if answer.retry else " Do not resend unchanged." if answer.code == "AE" else ""
        location = "^".join(_escape(p, _ACK_SYNTAX) for p in answer.location.split("^")[:6]) if answer.location else ""
        segments.append(
            "|".join(
                [
                    "ERR",
                    "",
                    location,
                    f"{condition}^{what}^HL70357",
                    "E",
                    "",
                    "",
                    "",
                    text(answer.text, 250 - len(hint)) + hint,
                ]
            )
        )
    message = "\r".join(segments) + "\r"
    return message.encode(CHARSETS[charset.upper()] if charset else "ascii", "replace")
