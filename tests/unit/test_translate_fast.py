"""The translate path's fast versions say exactly what their plain definitions say.

Each speed-up of ``gateway translate`` (ingest → translate → label → validate) replaced a plain
definition by a cheaper computation of the same value; each is compared here with that definition, on
arbitrary input (hypothesis) and on every fixture letter:

- ``fold`` (bytes translation) with the regex definition, on any text, with and without ``keep``;
- ``Lexicon.hit`` (one regex search on folded text) and ``hit_folded`` with the word / stem / phrase
  definition, on any term list and any text;
- ``strings_in`` with the stack walk it replaced;
- ``text_of`` (libxml2's text serialisation) with ``itertext``, and ``CdaContext.child`` / ``children``
  (remembered children) with lxml's ``find`` / ``findall``, on any tree, comments and CDATA included;
- ``esc`` with ``html.escape``, ``resource_id`` with ``uuid.uuid5``, the label stage's "meta after id"
  reordering and plain payload ids with ``fnmatch``.
"""

from __future__ import annotations

import fnmatch
import html
import re
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.label import _set_meta, rules_from
from gateway.mappings import CDA_NS
from gateway.pipeline import translate_letter
from gateway.settings import Settings
from gateway.text import Lexicon, _fold_plain, fold, fold_joined, strings_in
from gateway.translate.cda_types import CdaContext, child, children, q, text_of
from gateway.translate.ids import NAMESPACE, resource_id
from gateway.translate.narrative import esc
from tests.conftest import FIXED_NOW, FIXTURES, mappings

# text that exercises folding: ASCII letters and punctuation, accents, ligatures, fullwidth and
# compatibility characters, combining marks, spaces of every kind, control characters, surrogates
_ODD = "éÉàçœŒßﬁﬂ½²ＡＢｚ̧́\u00a0\u2009\u3000\t\n\r\x0b\x0c\x1c\x85İıǅ’«»…—\ud800"
_chars = st.one_of(st.characters(), st.sampled_from(list(_ODD)), st.sampled_from(list(" .-_*'abcXYZ019")))
_text = st.text(_chars, max_size=60)


def _fold_reference(text: str, keep: str = "") -> str:
    """fold() as first written: NFKD, ASCII only, lower case, runs of other characters → one space."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(f"[^a-z0-9{re.escape(keep)}]+", " ", ascii_text).strip()


@settings(max_examples=500, deadline=None)
@given(_text, st.sampled_from(["", "*", "*-", "-", "A", "_'", "^]\\", "é*", " *", "\t"]))
def test_fold_is_the_plain_definition(text: str, keep: str) -> None:
    assert fold(text, keep) == _fold_plain(text, keep) == _fold_reference(text, keep)


@settings(max_examples=200, deadline=None)
@given(st.lists(_text, max_size=6))
def test_folding_joined_strings_is_joining_folded_strings(parts: list[str]) -> None:
    # what the labeller relies on when it folds a resource's strings joined by spaces
    assert fold_joined(parts) == fold(" ".join(parts)) == " ".join(f for f in map(fold, parts) if f)


_word = st.text(st.sampled_from("abcdeiz019"), min_size=1, max_size=5)
_term = st.one_of(
    _word,
    st.builds(lambda w: w + "*", _word),  # a stem
    st.builds(lambda a, b: f"{a} {b}", _word, _word),  # a phrase
    st.builds(lambda a, b: f"{a} {b}*", _word, _word),  # a multi-word stem (matched as a phrase)
    st.builds(lambda a, b: f"{a}-{b}", _word, _word),
    st.sampled_from(["*", "É", "a*b", "x**", "  ", "dépress*", "Episode   Dépressif"]),
)
_folded_words = st.lists(st.one_of(_word, st.sampled_from(["s", "x", "abs", "abx", "a", "b"])), max_size=12)


@settings(max_examples=500, deadline=None)
@given(st.lists(_term, max_size=8), _folded_words, _text)
def test_lexicon_hit_is_the_word_stem_phrase_definition(terms: list[str], words: list[str], raw: str) -> None:
    lexicon = Lexicon(terms)
    folded = " ".join(words)
    for text in (folded, fold(raw), raw, f" {folded}", folded.replace(" ", "  "), f"{folded}\n"):
        expected = lexicon._hit_tokens(text, text.split())
        assert lexicon.hit(text) is expected
        assert lexicon.hit(text, text.split()) is expected
    for text in (folded, fold(raw)):  # hit_folded: only for what fold() returns
        assert lexicon.hit_folded(text) is lexicon._hit_tokens(text, text.split())


def test_label_lexicons_answer_the_same_on_every_fixture_text() -> None:
    compiled = rules_from(mappings()).compiled
    lexicons = [*compiled.lexicons.values(), *compiled.sensitive.values(), compiled.any_sensitive]
    lexicons += [lexicon for lexicon, _ in compiled.borderline]
    for path in sorted(FIXTURES.rglob("*")):
        if path.suffix not in (".xml", ".ccda", ".json"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in (text[i : i + 400] for i in range(0, len(text), 400)):
            folded = fold(chunk)
            for lexicon in lexicons:
                expected = lexicon._hit_tokens(folded, folded.split())
                assert lexicon.hit(folded) is expected
                assert lexicon.hit_folded(folded) is expected


def _strings_in_reference(node: object, skip: frozenset[str] = frozenset()) -> list[str]:
    """strings_in as first written."""
    out: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in skip)
        elif isinstance(item, list):
            stack.extend(item)
    return out


class _Str(str):
    pass


_json = st.recursive(
    st.one_of(st.text(max_size=3), st.integers(), st.booleans(), st.none(), st.builds(_Str, st.text(max_size=2))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "id", "div", "text", "system"]), inner, max_size=4),
        st.tuples(inner, inner),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json, st.sampled_from([frozenset(), frozenset({"id", "div"}), frozenset({"a", "text"})]))
def test_strings_in_is_the_stack_walk(node: Any, skip: frozenset[str]) -> None:
    assert strings_in(node, skip) == _strings_in_reference(node, skip)


# -- CDA trees -------------------------------------------------------------------------------------
_TAGS = ["id", "code", "text", "reference", "tr", "td", "entry"]


@st.composite
def _trees(draw: st.DrawFn) -> etree._Element:
    root = etree.Element(q("root"))
    nodes = [root]
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(nodes))
        kind = draw(st.sampled_from(["element", "element", "element", "foreign", "comment", "pi", "text", "cdata"]))
        if kind == "element":
            nodes.append(etree.SubElement(parent, q(draw(st.sampled_from(_TAGS)))))
        elif kind == "foreign":
            nodes.append(etree.SubElement(parent, draw(st.sampled_from(["td", "{urn:other}td", "{urn:other}id"]))))
        elif kind == "comment":
            parent.append(etree.Comment(draw(st.text("ab ", max_size=4)) or "c"))
        elif kind == "pi":
            parent.append(etree.ProcessingInstruction("pi", "x y"))
        else:
            words = draw(st.text(st.sampled_from("ab \t\né"), max_size=6))
            last = parent[-1] if len(parent) else None
            if last is not None and draw(st.booleans()):
                last.tail = (last.tail or "") + words
            else:
                parent.text = (parent.text or "") + (words if kind == "text" else "")
                if kind == "cdata" and not len(parent):
                    parent.text = etree.CDATA(words + "<&>")
    # through bytes and back, as a letter arrives (CDATA sections become text, as in a parsed letter)
    return etree.fromstring(etree.tostring(root))


@settings(max_examples=300, deadline=None)
@given(_trees(), st.lists(st.sampled_from(_TAGS), min_size=1, max_size=3))
def test_tree_lookups_are_lxml_find_findall_itertext(root: etree._Element, path: list[str]) -> None:
    ctx = CdaContext(mappings(), root, "tree.xml")
    xpath = "/".join(q(tag) for tag in path)
    for element in root.iter(etree.Element):  # (the reader never asks a comment or a PI)
        texts = [t for t in element.itertext() if isinstance(t, str)]
        assert text_of(element) == " ".join("".join(texts).split())
        assert ctx.child(element, *path) is element.find(xpath)
        assert ctx.children(element, *path) == element.findall(xpath)
        assert child(element, *path) is element.find(xpath)
        assert children(element, *path) == element.findall(xpath)


LETTERS = sorted(
    p
    for p in (*FIXTURES.rglob("*.xml"), *FIXTURES.rglob("*.ccda"))
    if p.parent.name != "bad" and etree.fromstring(p.read_bytes()).tag == f"{{{CDA_NS}}}ClinicalDocument"
)


@pytest.mark.parametrize("letter", LETTERS, ids=lambda p: p.name)
def test_context_lookups_match_find_on_every_letter(letter: Path) -> None:
    root = etree.fromstring(letter.read_bytes(), etree.XMLParser(remove_comments=True, remove_pis=True))
    ctx = CdaContext(mappings(), root, letter.name)
    for element in root.iter():
        for path in (("id",), ("text", "reference"), ("component", "section"), ("entry", "act", "code")):
            xpath = "/".join(q(tag) for tag in path)
            assert ctx.child(element, *path) is element.find(xpath)
            assert ctx.children(element, *path) == element.findall(xpath)
        for el in element.iter():  # the narrative index: the first element with that ID wins
            ident = el.get("ID")
            if ident is not None:
                first = next(e for e in root.iter() if e.get("ID") == ident)
                assert ctx.narrative(f"#{ident}") is first


# -- small pieces ----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, st.integers(), st.none(), st.builds(_Str, _text)))
def test_esc_is_html_escape(value: object) -> None:
    assert esc(value) == html.escape(str(value), quote=True)


@settings(max_examples=200, deadline=None)
@given(_text, st.lists(_text, max_size=3))
def test_resource_id_is_uuid5(resource_type: str, key: list[str]) -> None:
    try:
        expected = str(uuid.uuid5(NAMESPACE, "|".join((resource_type, *key))))
    except UnicodeEncodeError:  # lone surrogates: both refuse them
        with pytest.raises(UnicodeEncodeError):
            resource_id(resource_type, *key)
        return
    assert resource_id(resource_type, *key) == expected


def _set_meta_reference(res: dict[str, Any], security: list[Any]) -> None:
    res["meta"] = {**res.get("meta", {}), "security": security}
    ordered: dict[str, Any] = {k: res[k] for k in ("resourceType", "id", "meta") if k in res}
    ordered.update({k: v for k, v in res.items() if k not in ordered})
    res.clear()
    res.update(ordered)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["resourceType", "id", "meta", "text", "status", "a", "b"]), unique=True),
    st.booleans(),
)
def test_meta_goes_after_id_as_before(keys: list[str], meta_dict: bool) -> None:
    resource = {k: ({"versionId": "1"} if k == "meta" and meta_dict else f"v-{k}") for k in keys}
    if "meta" in resource and not meta_dict:
        resource["meta"] = {}
    expected, actual = dict(resource), dict(resource)
    _set_meta_reference(expected, [{"code": "x"}])
    _set_meta(actual, [{"code": "x"}])
    assert list(actual.items()) == list(expected.items())


@given(st.text(st.sampled_from("ab-.\\/!]^"), max_size=4), st.text(st.sampled_from("ab-.\\/!]^"), max_size=4))
def test_plain_payload_ids_match_as_fnmatch_does(element_id: str, pattern: str) -> None:
    assert fnmatch.fnmatchcase(element_id, pattern) == (element_id == pattern)


def test_letters_translate_the_same_from_many_threads() -> None:
    # the per-letter memos live in the letter's reading context, the lexicons' lazily compiled
    # patterns and the narrative XPath are shared or per thread: outputs cannot depend on the thread
    letters = sorted((FIXTURES / "dispatch").glob("*.xml"))[:6]
    jobs = [(p.read_bytes(), p.name) for p in letters] * 4

    def run(job: tuple[bytes, str]) -> bytes:
        raw, name = job
        return translate_letter(raw, name=name, mappings=mappings(), settings=Settings(), now=FIXED_NOW).json()

    expected = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, jobs)) == expected
