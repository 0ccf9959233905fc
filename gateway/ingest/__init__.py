"""Stage 1 — ingest: bytes in, a checked :class:`~gateway.model.SourceDocument` out.

Nothing downstream ever sees raw bytes.  This stage refuses, with a typed error naming what and
where, anything that is too large, not well-formed, unsafe (DTDs, entity declarations, XInclude),
wrongly encoded, or of a document type that no adapter declares in ``mappings/documents.yaml``.
"""

from __future__ import annotations

from gateway import validate
from gateway.errors import IngestError, TooLarge, UnsupportedDocument, Where
from gateway.ingest.json import parse_json
from gateway.ingest.xml import parse_xml
from gateway.mappings import DocumentKind, Mappings
from gateway.model import SourceDocument

__all__ = ["DEFAULT_MAX_BYTES", "read"]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024


def read(
    raw: bytes,
    *,
    name: str,
    mappings: Mappings,
    role: str = "letter",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SourceDocument:
    """Check and parse one input; ``role`` is ``letter`` or ``prior`` (what the document is for)."""
    where = Where(source=name)
    if len(raw) > max_bytes:
        raise TooLarge(f"document is {len(raw)} bytes, over the {max_bytes}-byte limit", where=where)
    if not raw.strip():
        raise UnsupportedDocument("document is empty", where=where)
    stripped = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"%PDF"):
        raise UnsupportedDocument(
            "a PDF carries no structured content: send the CDA letter (or a FHIR document)", where=where
        )
    head = stripped[:1]
    if head in (b"{", b"["):
        tree_json = parse_json(raw, name)
        # the FHIR adapter reads elements by their R4 types: a value of another JSON type is refused here
        problems = validate.problems(tree_json, fhir_json=True)
        if problems:
            raise IngestError(f"not valid FHIR R4: {problems[0]}", where=where)
        kind = mappings.detect_fhir(tree_json, role=role, where=where)
        return SourceDocument(kind.format, "application/fhir+json", raw, name, tree_json)
    root = parse_xml(raw, name)
    kind_xml: DocumentKind = mappings.detect_cda(root, role=role, where=where)
    return SourceDocument(kind_xml.format, "application/hl7-cda+xml", raw, name, root)
