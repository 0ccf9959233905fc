"""The CDA reader's fast lookups give exactly what lxml's find/findall/itertext give.

``child``/``children`` replace ``find``/``findall`` on CDA paths and ``text_of`` reads a leaf without
``itertext``, for speed; these tests compare them with the lxml originals on every element of every
fixture letter, and check that the sensitivity pre-filter never hides a code a rule's lexicon finds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from gateway.label import rules_from
from gateway.mappings import CDA_NS
from gateway.text import fold
from gateway.translate.cda_types import child, children, q, text_of
from tests.conftest import FIXTURES, mappings

LETTERS = sorted(
    p
    for p in (*FIXTURES.rglob("*.xml"), *FIXTURES.rglob("*.ccda"))
    if p.parent.name != "bad" and etree.fromstring(p.read_bytes()).tag == f"{{{CDA_NS}}}ClinicalDocument"
)
PATHS = [
    ("id",),
    ("code",),
    ("templateId",),
    ("text", "reference"),
    ("component", "section"),
    ("entry", "substanceAdministration"),
    ("consumable", "manufacturedProduct", "manufacturedMaterial"),
    ("author", "assignedAuthor"),
    ("thead", "tr"),
]


def _elements(path: Path) -> list[etree._Element]:
    root = etree.fromstring(path.read_bytes(), etree.XMLParser(remove_comments=True, remove_pis=True))
    return [e for e in root.iter() if isinstance(e.tag, str)]


@pytest.mark.parametrize("letter", LETTERS, ids=lambda p: p.name)
def test_child_and_children_match_find_and_findall(letter: Path) -> None:
    for element in _elements(letter):
        for path in PATHS:
            xpath = "/".join(q(tag) for tag in path)
            assert child(element, *path) is element.find(xpath)
            assert children(element, *path) == element.findall(xpath)


@pytest.mark.parametrize("letter", LETTERS, ids=lambda p: p.name)
def test_text_of_matches_itertext(letter: Path) -> None:
    for element in _elements(letter):
        texts = [t for t in element.itertext() if isinstance(t, str)]
        assert text_of(element) == " ".join("".join(texts).split())


@pytest.mark.parametrize("letter", LETTERS, ids=lambda p: p.name)
def test_sensitivity_prefilter_is_exact(letter: Path) -> None:
    compiled = rules_from(mappings()).compiled
    for element in _elements(letter):
        folded = fold(text_of(element))
        tokens = folded.split()
        expected = [code for code, lexicon in compiled.sensitive.items() if lexicon.hit(folded, tokens)]
        assert compiled.sensitive_in_text(folded) == expected


def test_sensitivity_prefilter_finds_every_term() -> None:
    rules = rules_from(mappings())
    for rule in rules.sensitivity.rules:
        for term in rule.terms:
            text = fold(f"le patient {term.replace('*', 'ique')} ce jour")
            assert rule.code in rules.compiled.sensitive_in_text(text), term
