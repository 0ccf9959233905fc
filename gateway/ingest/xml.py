"""Hardened XML parsing for CDA letters (lxml).

Hospital letters come from outside the gateway's trust boundary, so the parser never loads a DTD,
never resolves an entity, never touches the network, and refuses any document that declares a DTD or
an entity at all (XXE, billion laughs, quadratic blow-up) instead of trying to parse it safely.
Processing instructions and comments are dropped: real letters carry ``<?xml-stylesheet?>``.
"""

from __future__ import annotations

import re

from lxml import etree

from gateway.errors import EncodingError, IngestError, UnsafeInput, Where

__all__ = ["parse_xml"]

_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_XINCLUDE_NS = "http://www.w3.org/2001/XInclude"
_POSITION_SUFFIX = re.compile(r",? line \d+, column \d+\s*$")
_ENCODING_HINTS = ("encoding", "utf-8", "utf8", "bytes", "char", "codec")


def _line(element: etree._Element) -> int | None:
    line = element.sourceline
    return line if isinstance(line, int) else None


def _make_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        remove_comments=True,
        collect_ids=False,
    )


def _text_for_scan(raw: bytes) -> bytes:
    """Bytes in an ASCII-compatible form, so a UTF-16 letter cannot hide its DOCTYPE."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16").encode("utf-8", "replace")
        except UnicodeDecodeError as exc:
            raise EncodingError(f"invalid UTF-16: {exc.reason}") from None
    return raw


def parse_xml(raw: bytes, name: str) -> etree._Element:
    """Parse ``raw`` as XML and return its root, or raise an :class:`IngestError` subclass."""
    match = _DECLARATION.search(_text_for_scan(raw))
    if match is not None:
        line = raw[: match.start()].count(b"\n") + 1
        what = match.group(1).decode().upper()
        raise UnsafeInput(
            f"{what} declaration refused: letters must not declare a DTD or entities (XXE / entity expansion)",
            where=Where(source=name, line=line),
        )
    try:
        root = etree.fromstring(raw, _make_parser())
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (None, None)
        where = Where(source=name, line=line, column=column)
        message = _POSITION_SUFFIX.sub("", (exc.msg or str(exc)).strip())
        lowered = message.lower()
        if "depth" in lowered or "huge" in lowered:
            raise UnsafeInput(f"document nests elements too deeply: {message}", where=where) from None
        if any(hint in lowered for hint in _ENCODING_HINTS):
            raise EncodingError(f"wrong or undeclared character encoding: {message}", where=where) from None
        raise IngestError(f"malformed XML: {message}", where=where) from None
    except ValueError as exc:  # e.g. unicode strings with encoding declarations
        raise EncodingError(f"unreadable XML: {exc}", where=Where(source=name)) from None
    if root.getroottree().docinfo.internalDTD is not None:
        raise UnsafeInput("DTD refused", where=Where(source=name))
    for element in root.iter(f"{{{_XINCLUDE_NS}}}*"):
        raise UnsafeInput(
            "XInclude element refused: letters must not reference external content",
            where=Where(source=name, line=_line(element)),
        )
    return root
