"""Hypothesis strategies for hostile letters: CDA XML and FHIR JSON document Bundles.

Both start from the real fixtures and mutate them, so most cases get past the first byte and reach
the deeper stages (detection, translation, labelling, validation) before something is wrong:

- CDA: delete an element (a required header part, a section, an entry), duplicate one, set an
  attribute or a text to hostile text (markup, huge values, control characters, RTL marks...), nest
  an element deeply; then at the byte level inject a DTD / entities / external references / PIs,
  splice random bytes, truncate, or re-encode (UTF-16 with and without BOM, Latin-1 declared UTF-8).
- FHIR: delete a key, duplicate a list item, retype a value (huge numbers, NaN, Infinity, strings,
  nulls, nested lists), change a ``resourceType``, nest deeply, duplicate keys in the text.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from lxml import etree

from tests.conftest import FIXTURES

__all__ = ["CDA_FIXTURES", "FHIR_FIXTURES", "cda_documents", "fhir_documents", "hostile_text"]

CDA_FIXTURES: tuple[Path, ...] = tuple(
    sorted(
        [*(FIXTURES / "cda").glob("*.xml"), *(FIXTURES / "dispatch").glob("*.xml"), *(FIXTURES / "ccda").glob("*.ccda")]
    )
)
FHIR_FIXTURES: tuple[Path, ...] = tuple(sorted((FIXTURES / "fhir").glob("*.json")))

_HOSTILE_SNIPPETS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "'; DROP TABLE letter;--",
    "1 OR 1=1",
    "../../etc/passwd",
    "\u202e\u0000\ufeff\ud7ff",
    "&amp;&lt;&#x0;",
    "]]>",
    "%s%n{0}${jndi:ldap://x}",
]


def hostile_text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Text an attacker might put anywhere: markup, SQL, paths, odd code points, or very long runs."""
    xml_chars = st.characters(codec="utf-8", exclude_characters="\x00")  # no lone surrogates
    return st.one_of(
        st.sampled_from(_HOSTILE_SNIPPETS),
        st.text(xml_chars, max_size=max_size),
        st.integers(10_000, 2_000_000).map(lambda n: "A" * n),
    )


@cache
def _tree(path: Path) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, remove_pis=False)
    return etree.fromstring(path.read_bytes(), parser)


# characters XML 1.0 cannot carry: lxml refuses them in a tree (the byte mutations below still send them)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _set_attribute(element: etree._Element, value: str, pick: int) -> None:
    names = list(element.attrib) or ["code"]
    element.set(names[pick % len(names)], _NOT_XML.sub("?", value))


def _set_text(element: etree._Element, value: str) -> None:
    element.text = _NOT_XML.sub("?", value)


@st.composite
def _mutated_tree(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(CDA_FIXTURES))
    root = copy.deepcopy(_tree(path))
    for _ in range(draw(st.integers(1, 4))):
        elements = [e for e in root.iter() if isinstance(e.tag, str)]
        target = elements[draw(st.integers(0, len(elements) - 1))]
        op = draw(st.sampled_from(["delete", "duplicate", "attribute", "text", "nest", "rename"]))
        parent = target.getparent()
        if op == "delete" and parent is not None:
            parent.remove(target)
        elif op == "duplicate" and parent is not None:
            parent.insert(parent.index(target), copy.deepcopy(target))
        elif op == "attribute":
            _set_attribute(target, draw(hostile_text()), draw(st.integers(0, 50)))
        elif op == "text":
            _set_text(target, draw(hostile_text()))
        elif op == "nest" and parent is not None:
            depth = draw(st.integers(10, 400))
            index = parent.index(target)
            outer = inner = etree.Element(target.tag)
            for _ in range(depth):
                inner = etree.SubElement(inner, target.tag)
            inner.append(target)
            parent.insert(index, outer)
        elif op == "rename":
            target.tag = draw(
                st.sampled_from(["{urn:hl7-org:v3}foo", "bar", "{http://www.w3.org/2001/XInclude}include"])
            )
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


_DTDS = [
    b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "http://127.0.0.1:9/x">]>',
    b'<!DOCTYPE ClinicalDocument SYSTEM "http://127.0.0.1:9/cda.dtd">',
    b'<!DOCTYPE ClinicalDocument [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>',
    b'<!DOCTYPE ClinicalDocument [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>',
    b"<!doctype ClinicalDocument>",
    b'<?xml-stylesheet type="text/xsl" href="file:///etc/passwd"?>',
    b"<?php system('id'); ?>",
    b"<!-- " + b"-" * 100 + b" -->",
]


def _splice(data: bytes, at: int, insert: bytes, cut: int = 0) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + insert + data[at + cut :]


@st.composite
def _byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    op = draw(st.sampled_from(["none", "dtd", "splice", "truncate", "utf16", "utf16-nobom", "latin1", "entity-ref"]))
    if op == "dtd":
        end = data.find(b"?>") + 2 if data.startswith(b"<?xml") else 0
        return _splice(data, end, draw(st.sampled_from(_DTDS)))
    if op == "splice":
        return _splice(data, draw(st.integers(0, len(data))), draw(st.binary(max_size=32)), draw(st.integers(0, 8)))
    if op == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if op in ("utf16", "utf16-nobom"):
        encoded = data.decode("utf-8", "replace").encode("utf-16-le")
        return (b"\xff\xfe" + encoded) if op == "utf16" else encoded
    if op == "latin1":
        return data.decode("utf-8", "replace").encode("latin-1", "replace")
    if op == "entity-ref":
        at = data.find(b"<title>")
        return _splice(data, at + 7 if at >= 0 else len(data) // 2, b"&xxe;&#0;&#xD800;&lt;")
    return data


@st.composite
def cda_documents(draw: st.DrawFn) -> bytes:
    """A mutated CDA / C-CDA letter as bytes (occasionally plain random bytes)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=256))
    return draw(_byte_mutation(draw(_mutated_tree())))


# -- FHIR ----------------------------------------------------------------------------------------------
@cache
def _json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if len(prefix) > 40:
        return found
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _retyped() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(
            [None, True, 0, -1, 10**30, -(10**400), 1e308, math.nan, math.inf, -math.inf, "", [], {}, [[]], {"a": {}}]
        ),
        hostile_text(),
        st.integers(),
        st.floats(),
        st.sampled_from(["Patient", "Bundle", "OperationOutcome", "Binary", "Nope", "Composition"]).map(
            lambda t: {"resourceType": t}
        ),
    )


_DEEP = re.compile(r'"__deep_(\d+)__"')


def _deepen(text: str) -> str:
    """Replace each deep-nesting marker by that many nested lists (written as text: json.dumps would recurse)."""
    return _DEEP.sub(lambda m: "[" * int(m.group(1)) + '"x"' + "]" * int(m.group(1)), text)


@st.composite
def _mutated_json(draw: st.DrawFn) -> Any:
    # mostly the document letter (the other fixtures are a prior list and refused shapes)
    documents = [p for p in FHIR_FIXTURES if p.name == "document-s1.json"]
    base = draw(st.one_of(st.sampled_from(documents * 3 or FHIR_FIXTURES), st.sampled_from(FHIR_FIXTURES)))
    document = copy.deepcopy(_json(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        path = paths[draw(st.integers(0, len(paths) - 1))]
        if not path:
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        op = draw(st.sampled_from(["delete", "duplicate", "retype", "resourceType", "deep", "text", "text"]))
        if op == "text" and isinstance(parent[last], str):  # the same JSON type: gets past the R4 type check
            parent[last] = draw(hostile_text())
        elif op == "delete":
            del parent[last]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif op == "resourceType" and isinstance(parent, dict):
            parent["resourceType"] = draw(st.sampled_from(["Patient", "Bundle", "Nope", "", "composition", 7]))
        elif op == "deep":
            parent[last] = f"__deep_{draw(st.integers(50, 3000))}__"
        else:
            parent[last] = draw(_retyped())
    return document


@st.composite
def fhir_documents(draw: st.DrawFn) -> bytes:
    """A mutated FHIR document Bundle as JSON bytes (NaN/Infinity written as the bare tokens)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=256))
    text = _deepen(json.dumps(draw(_mutated_json()), ensure_ascii=draw(st.booleans())))
    raw = text.encode("utf-8", "surrogatepass")
    op = draw(st.sampled_from(["none"] * 6 + ["dup-key", "truncate", "bad-utf8", "splice"]))
    if op == "dup-key":
        return raw.replace(b'"resourceType": "Bundle"', b'"resourceType": "Bundle", "resourceType": "Patient"', 1)
    if op == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if op == "bad-utf8":
        return _splice(raw, draw(st.integers(0, len(raw))), b"\xc3\x28\xff")
    if op == "splice":
        return _splice(raw, draw(st.integers(0, len(raw))), draw(st.binary(max_size=16)))
    return raw
