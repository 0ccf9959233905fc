"""IHE XDM media (ITI-32) for MSSanté: the ``IHE_XDM.ZIP`` a mail carries.

MSSanté receivers (hospital integration platforms, GP software) unzip ``IHE_XDM.ZIP`` and read
``IHE_XDM/SUBSET01/METADATA.XML`` — an ebRIM ``SubmitObjectsRequest`` with one SubmissionSet and
one DocumentEntry per file — to know what each file is.  The archive holds the sealed FHIR message
exactly as signed (``MESSAGE.JSON``: its bytes are never re-serialised, or the detached JWS would
break) and, when the recipient may see it, the original letter (``DOC0001.XML`` for a CDA, ``.PDF``
for a PDF).  Everything needed for the mail's ``X-MSS-*`` headers is read here, once, in
:func:`read_message`.  Metadata carries identifiers and codes only: no patient name, no clinical text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import io
import re
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from lxml import etree

from gateway.errors import GatewayError, IngestError
from gateway.ingest.xml import parse_xml
from gateway.translate.ids import resource_id

__all__ = [
    "ZIP_NAME",
    "Code",
    "Contents",
    "Document",
    "XdmError",
    "build_xdm",
    "metadata_xml",
    "read_message",
    "safe_name",
]

ZIP_NAME = "IHE_XDM.ZIP"
SUBSET = "IHE_XDM/SUBSET01"
DEFAULT_SOURCE_ID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://discharge-gateway.fr/xdm-source").int)
GENERIC_TITLE = "Notification de sortie d'hospitalisation"

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
HL7V3 = "urn:hl7-org:v3"
# ITI TF-3 §4.2.5: the fixed UUIDs of the XDS metadata model
STABLE_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
DE_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"

INS_OIDS = ("1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.11", "1.2.250.1.213.1.4.10")  # INS-NIR, INS-NIA, test
LOINC = "2.16.840.1.113883.6.1"
IHE_FORMAT = "1.3.6.1.4.1.19376.1.2.3"  # TRE_A11-IheFormatCode
CISIS_FORMAT = "1.2.250.1.213.1.1.4.2.282"  # TRE_A06-FormatCodeComplementaire
CONFIDENTIALITY = "2.16.840.1.113883.5.25"
_SYSTEM_OIDS = {
    "http://loinc.org": LOINC,
    "http://terminology.hl7.org/CodeSystem/v3-Confidentiality": CONFIDENTIALITY,
}
_CISIS_FORMATS = {
    "11490-0": ("urn:asip:ci-sis:ldl-ses:2017", "Lettre de liaison à la sortie d'un établissement de santé"),
    "18761-7": ("urn:asip:ci-sis:ldl-ees:2017", "Lettre de liaison à l'entrée d'un établissement de santé"),
}
_XML_TYPES = ("application/hl7-cda+xml", "text/xml", "application/xml")
_EXTENSIONS = {"application/pdf": "PDF", "text/plain": "TXT", **dict.fromkeys(_XML_TYPES, "XML")}
_UNSAFE = re.compile(r"[^A-Z0-9_]")


class XdmError(GatewayError):
    """A payload that is not a FHIR message Bundle this gateway could have produced."""

    issue_code = "structure"


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    scheme: str  # the codingScheme OID
    display: str


@dataclass(frozen=True, slots=True)
class Document:
    """One file of the submission set and what its DocumentEntry says about it."""

    file_name: str
    data: bytes
    mime_type: str
    unique_id: str
    title: str
    creation_time: str | None = None  # XDS DTM, UTC
    type_code: Code | None = None
    format_code: Code | None = None
    confidentiality: Code | None = None
    is_cda: bool = False

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.data).hexdigest()


@dataclass(frozen=True, slots=True)
class Contents:
    """What one sealed message carries, read once for the XDM archive and the mail's ``X-MSS-*`` headers."""

    message_id: str
    timestamp: str  # Bundle.timestamp (ISO 8601): submission time, and the zip's file dates
    documents: tuple[Document, ...]  # MESSAGE.JSON first
    patient_id: str | None  # HL7 CX, INS preferred over IPP
    cda_codes: tuple[str, ...]  # the CDA header codes (X-MSS-CODECDA)
    cda_has_ins: bool  # an attached CDA names the patient by INS (X-MSS-INS)
    title: str  # what the mail is about, for its Subject: a document type, never patient data

    @property
    def has_cda(self) -> bool:
        return any(d.is_cda for d in self.documents)


def safe_name(name: str, default: str = "FILE") -> str:
    """One archive path component in ISO 9660-like form (XDM media): no separators, no ``..``, ASCII only."""
    stem, dot, ext = name.rpartition(".") if "." in name.strip(".") else (name, "", "")
    clean_stem = _UNSAFE.sub("_", stem.upper()).strip("_")[:16] or default
    clean_ext = _UNSAFE.sub("", ext.upper())[:4]
    return f"{clean_stem}.{clean_ext}" if dot and clean_ext else clean_stem


def _member(*parts: str) -> str:
    """An archive member path whose every component went through :func:`safe_name`."""
    for part in parts:
        if safe_name(part) != part:
            raise ValueError(f"unsafe archive path component {part!r}")
    return "/".join(parts)


def _oid_of(system: str) -> str | None:
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:") :]
    return _SYSTEM_OIDS.get(system)


def _uuid_oid(*key: str) -> str:
    """A deterministic OID under 2.25 (ITU-T X.667), for ids that are not OIDs already."""
    return "2.25." + str(uuid.UUID(resource_id("XDM", *key)).int)


def _dtm(value: str | None) -> str | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # an XDS DTM is UTC; never guess a zone
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _coding(concept: Mapping[str, Any] | None) -> Code | None:
    for coding in (concept or {}).get("coding", []):
        scheme = _oid_of(str(coding.get("system", "")))
        if scheme and coding.get("code"):
            return Code(str(coding["code"]), scheme, str(coding.get("display") or (concept or {}).get("text") or ""))
    return None


def _confidentiality(labels: Iterable[Mapping[str, Any]]) -> Code | None:
    for label in labels:
        for coding in label.get("coding", [label]):
            if _oid_of(str(coding.get("system", ""))) == CONFIDENTIALITY and coding.get("code"):
                return Code(str(coding["code"]), CONFIDENTIALITY, str(coding.get("display") or coding["code"]))
    return None


def _patient_id(resources: Iterable[Mapping[str, Any]]) -> str | None:
    """The message's patient as an HL7 CX: the INS (type NH) when there is one, else the IPP (type PI)."""
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None:
        return None
    idents = [(_oid_of(str(i.get("system", ""))), str(i.get("value", "")), i) for i in patient.get("identifier", [])]
    for oid in INS_OIDS:
        for system, value, _ in idents:
            if system == oid and value:
                return f"{value}^^^&{oid}&ISO^NH"
    for system, value, ident in idents:
        codes = {c.get("code") for c in ident.get("type", {}).get("coding", [])}
        if system and value and "PI" in codes:
            return f"{value}^^^&{system}&ISO^PI"
    return None


def _patient_names(resources: Iterable[Mapping[str, Any]]) -> set[str]:
    names: set[str] = set()
    for res in resources:
        if res.get("resourceType") != "Patient":
            continue
        for name in res.get("name", []):
            for part in [name.get("family", ""), *name.get("given", [])]:
                names.update(w for w in re.split(r"[\s\-']+", str(part).lower()) if len(w) > 1)
    return names


@dataclass(frozen=True, slots=True)
class _Cda:
    code: str | None
    unique_id: str | None
    has_ins: bool


def _read_cda(data: bytes) -> _Cda | None:
    """The header facts the mail needs, from the letter itself (hardened parser); None if not a CDA."""
    try:
        root = parse_xml(data, "attachment")
    except IngestError:
        return None
    if root.tag != f"{{{HL7V3}}}ClinicalDocument":
        return None
    code = root.find(f"{{{HL7V3}}}code")
    ident = root.find(f"{{{HL7V3}}}id")
    unique_id = None
    if ident is not None and ident.get("root"):
        unique_id = str(ident.get("root")) + (f"^{ident.get('extension')}" if ident.get("extension") else "")
    ids = root.iterfind(f"{{{HL7V3}}}recordTarget/{{{HL7V3}}}patientRole/{{{HL7V3}}}id")
    has_ins = any(i.get("root") in INS_OIDS and i.get("extension") for i in ids)
    return _Cda(code.get("code") if code is not None else None, unique_id, has_ins)


def _title(doc_ref: Mapping[str, Any], names: set[str]) -> str:
    """The document type's label for the Subject — dropped if it happens to contain a patient name."""
    concept = doc_ref.get("type", {})
    candidates = [c.get("display") for c in concept.get("coding", [])] + [concept.get("text")]
    for text in candidates:
        if text and not names & set(re.split(r"[\s\-'’]+", str(text).lower())):
            return str(text)
    return GENERIC_TITLE


def read_message(payload: bytes) -> Contents:
    """Read a sealed FHIR message Bundle (bytes kept as they are) into what the archive and headers need."""
    try:
        bundle = orjson.loads(payload)
        header = bundle["entry"][0]["resource"]
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "message":
            raise XdmError("payload is not a FHIR message Bundle")
        if header.get("resourceType") != "MessageHeader" or not header.get("id"):
            raise XdmError("the message's first entry is not a MessageHeader")
        resources = [e["resource"] for e in bundle["entry"]]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise XdmError("payload is not a FHIR message Bundle") from None
    message_id = str(header["id"])
    timestamp = str(bundle.get("timestamp") or "")
    names = _patient_names(resources)
    message_doc = Document(
        "MESSAGE.JSON",
        payload,
        "application/fhir+json",
        _uuid_oid(message_id, "message"),
        "Message FHIR",
        _dtm(timestamp),
        format_code=Code("urn:ihe:iti:xds:2017:mimeTypeSufficient", IHE_FORMAT, "Format from mimeType"),
        confidentiality=_confidentiality(bundle.get("meta", {}).get("security", [])),
    )
    documents = [message_doc]
    cda_codes: list[str] = []
    cda_has_ins = False
    title = GENERIC_TITLE
    for res in resources:
        if res.get("resourceType") != "DocumentReference":
            continue
        type_code = _coding(res.get("type"))
        master = res.get("masterIdentifier", {})
        master_oid = _oid_of(str(master.get("system", "")))
        for content in res.get("content", []):
            attachment = content.get("attachment", {})
            if "data" not in attachment:
                continue
            try:
                data = base64.b64decode(attachment["data"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise XdmError(f"DocumentReference/{res.get('id')} carries invalid base64") from None
            mime = str(attachment.get("contentType", "application/octet-stream")).split(";")[0].strip().lower()
            cda = _read_cda(data) if mime in _XML_TYPES else None
            number = len(documents)
            unique_id = (cda.unique_id if cda else None) or (
                f"{master_oid}^{master['value']}" if master_oid and master.get("value") and number == 1 else None
            )
            format_code = None
            if cda is not None and type_code is not None and type_code.code in _CISIS_FORMATS:
                format_urn, format_display = _CISIS_FORMATS[type_code.code]
                format_code = Code(format_urn, CISIS_FORMAT, format_display)
            elif mime == "application/pdf":
                format_code = Code("urn:ihe:iti:xds-sd:pdf:2008", IHE_FORMAT, "PDF embedded in CDA")
            documents.append(
                Document(
                    _member(f"DOC{number:04d}.{_EXTENSIONS.get(mime, 'BIN')}"),
                    data,
                    mime,
                    unique_id or _uuid_oid(message_id, "document", hashlib.sha1(data).hexdigest()),
                    str(attachment.get("title") or (type_code.display if type_code else "Document")),
                    _dtm(res.get("date")),
                    type_code,
                    format_code,
                    _confidentiality(res.get("securityLabel", [])),
                    is_cda=cda is not None,
                )
            )
            if cda is not None:
                code = cda.code or (type_code.code if type_code else None)
                if code and code not in cda_codes:
                    cda_codes.append(code)
                cda_has_ins = cda_has_ins or cda.has_ins
            if title == GENERIC_TITLE:
                title = _title(res, names)
    return Contents(
        message_id, timestamp, tuple(documents), _patient_id(resources), tuple(cda_codes), cda_has_ins, title
    )


# -- METADATA.XML ----------------------------------------------------------------------------------
def _r(tag: str) -> str:
    return f"{{{RIM}}}{tag}"


# characters XML 1.0 cannot carry (a FHIR string may hold "\u0001"): replaced, or lxml refuses the whole metadata
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml_text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _slot(parent: etree._Element, name: str, *values: str) -> None:
    slot = etree.SubElement(parent, _r("Slot"), name=name)
    value_list = etree.SubElement(slot, _r("ValueList"))
    for value in values:
        etree.SubElement(value_list, _r("Value")).text = _xml_text(value)


def _name(parent: etree._Element, text: str) -> None:
    etree.SubElement(etree.SubElement(parent, _r("Name")), _r("LocalizedString"), value=_xml_text(text))


def _classification(parent: etree._Element, scheme: str, owner: str, code: Code, ident: str) -> None:
    element = etree.SubElement(
        parent,
        _r("Classification"),
        id=ident,
        classificationScheme=scheme,
        classifiedObject=owner,
        nodeRepresentation=code.code,
    )
    _slot(element, "codingScheme", code.scheme)
    _name(element, code.display or code.code)


def _external_id(parent: etree._Element, scheme: str, owner: str, value: str, label: str, ident: str) -> None:
    element = etree.SubElement(
        parent, _r("ExternalIdentifier"), id=ident, registryObject=owner, identificationScheme=scheme, value=value
    )
    _name(element, label)


def metadata_xml(contents: Contents, *, source_id: str = DEFAULT_SOURCE_ID, recipient: str | None = None) -> bytes:
    """The ebRIM SubmitObjectsRequest (ITI-41 metadata as XDM uses it) describing every file of the subset."""

    def uid(*key: str) -> str:
        return "urn:uuid:" + resource_id("XDM", contents.message_id, *key)

    root = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM, "rim": RIM})
    objects = etree.SubElement(root, _r("RegistryObjectList"))
    ss = uid("submission-set")
    package = etree.SubElement(objects, _r("RegistryPackage"), id=ss)
    _slot(package, "submissionTime", _dtm(contents.timestamp) or datetime.now(UTC).strftime("%Y%m%d%H%M%S"))
    if recipient:
        _slot(package, "intendedRecipient", f"|^^Internet^{recipient}")
    _name(package, contents.title)
    _external_id(
        package,
        SS_UNIQUE_ID,
        ss,
        _uuid_oid(contents.message_id, "submission-set"),
        "XDSSubmissionSet.uniqueId",
        uid("ss-uid"),
    )
    _external_id(package, SS_SOURCE_ID, ss, source_id, "XDSSubmissionSet.sourceId", uid("ss-source"))
    if contents.patient_id:
        _external_id(package, SS_PATIENT_ID, ss, contents.patient_id, "XDSSubmissionSet.patientId", uid("ss-pid"))
    etree.SubElement(
        objects, _r("Classification"), id=uid("ss-node"), classifiedObject=ss, classificationNode=SUBMISSION_SET_NODE
    )
    for index, doc in enumerate(contents.documents, start=1):
        de = uid("document", str(index))
        entry = etree.SubElement(objects, _r("ExtrinsicObject"), id=de, mimeType=doc.mime_type, objectType=STABLE_ENTRY)
        if doc.creation_time:
            _slot(entry, "creationTime", doc.creation_time)
        _slot(entry, "hash", doc.sha1)
        _slot(entry, "size", str(len(doc.data)))
        _slot(entry, "languageCode", "fr-FR")
        if contents.patient_id:
            _slot(entry, "sourcePatientId", contents.patient_id)
        _slot(entry, "URI", doc.file_name)
        _name(entry, doc.title)
        if doc.confidentiality:
            _classification(entry, DE_CONFIDENTIALITY, de, doc.confidentiality, uid("conf", str(index)))
        if doc.format_code:
            _classification(entry, DE_FORMAT, de, doc.format_code, uid("format", str(index)))
        if doc.type_code:
            _classification(entry, DE_TYPE, de, doc.type_code, uid("type", str(index)))
        if contents.patient_id:
            _external_id(
                entry, DE_PATIENT_ID, de, contents.patient_id, "XDSDocumentEntry.patientId", uid("pid", str(index))
            )
        _external_id(entry, DE_UNIQUE_ID, de, doc.unique_id, "XDSDocumentEntry.uniqueId", uid("uid", str(index)))
        association = etree.SubElement(
            objects,
            _r("Association"),
            id=uid("association", str(index)),
            associationType=HAS_MEMBER,
            sourceObject=ss,
            targetObject=de,
        )
        _slot(association, "SubmissionSetStatus", "Original")
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


# -- the archive ------------------------------------------------------------------------------------
def _index_htm(contents: Contents) -> bytes:
    rows = "".join(
        f'<li><a href="{SUBSET}/{d.file_name}">{html.escape(d.title)}</a> ({html.escape(d.mime_type)}, {len(d.data)} octets)</li>'
        for d in contents.documents
    )
    page = (
        '<!DOCTYPE html>\r\n<html lang="fr"><head><meta charset="utf-8"><title>IHE XDM</title></head><body>\r\n'
        f"<h1>{html.escape(contents.title)}</h1>\r\n<p>Support IHE XDM, lot SUBSET01 "
        f'(<a href="{SUBSET}/METADATA.XML">METADATA.XML</a>) :</p>\r\n<ul>{rows}</ul>\r\n</body></html>\r\n'
    )
    return page.encode("utf-8")


def _readme(contents: Contents) -> bytes:
    from gateway import __version__

    lines = [
        "IHE XDM media (ITI-32 Distribute Document Set on Media)",
        f"Created by: discharge-gateway {__version__}",
        f"Message: {contents.message_id}",
        "Content: IHE_XDM/SUBSET01 - METADATA.XML (ebRIM metadata), MESSAGE.JSON (FHIR R4 message, signed),",
        "         DOCnnnn.* (original documents, when the recipient may receive them).",
        "The FHIR message carries a detached JWS in Bundle.signature: do not re-serialise MESSAGE.JSON before checking it.",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def build_xdm(contents: Contents, *, source_id: str = DEFAULT_SOURCE_ID, recipient: str | None = None) -> bytes:
    """The ``IHE_XDM.ZIP`` bytes; deterministic for one message (same files, same dates), so retries match."""
    stamp = datetime.fromisoformat(contents.timestamp) if contents.timestamp else datetime(2000, 1, 1)
    date_time = (max(stamp.year, 1980), stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)
    files = [
        (_member("INDEX.HTM"), _index_htm(contents)),
        (_member("README.TXT"), _readme(contents)),
        (
            _member("IHE_XDM", "SUBSET01", "METADATA.XML"),
            metadata_xml(contents, source_id=source_id, recipient=recipient),
        ),
        *((_member("IHE_XDM", "SUBSET01", d.file_name), d.data) for d in contents.documents),
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()
