"""The faster cut and seal say exactly what the plain definitions say, from any thread, letter by letter."""

from __future__ import annotations

import copy
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws

from gateway import redact, seal
from gateway.label import rules_from
from gateway.pipeline import Cut, cut_for, prepare
from gateway.route import route
from gateway.settings import Settings
from gateway.text import Lexicon, _trie, fold
from tests.conftest import FIXTURES, mappings
from tests.dispatch_cases import directory, store

S6 = FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml"
AT = datetime.fromisoformat("2026-11-16T09:00:00+01:00")

# JSON shaped like FHIR: dicts with "reference"s to a few urns, lists, empty containers, scalars
_URNS = [f"urn:uuid:{n}" for n in range(4)]
_scalars = st.one_of(st.sampled_from(_URNS), st.text(max_size=3), st.integers(), st.booleans(), st.none())
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["reference", "a", "b", "display"]), inner, max_size=4),
    ),
    max_leaves=25,
)


def _refers_to(node: Any, removed: set[str]) -> bool:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in removed:
            return True
        return any(_refers_to(v, removed) for v in node.values())
    if isinstance(node, list):
        return any(_refers_to(v, removed) for v in node)
    return False


def _prune_plain(node: Any, removed: set[str]) -> Any:
    """The definition the one-walk version replaced."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(value.get("reference"), str) and value["reference"] in removed:
                continue
            pruned = _prune_plain(value, removed)
            if pruned not in ([], {}):
                out[key] = pruned
        return out
    if isinstance(node, list):
        return [_prune_plain(item, removed) for item in node if not _refers_to(item, removed)]
    return node


@settings(max_examples=400, deadline=None)
@given(_json, st.sets(st.sampled_from(_URNS)))
def test_pruning_in_one_walk_is_the_plain_definition(node: Any, removed: set[str]) -> None:
    pruned, refers = redact._pruned_node(node, removed)
    assert repr(pruned) == repr(_prune_plain(node, removed))
    assert refers == _refers_to(node, removed)
    # only the references the node holds matter: what a memo keyed on them relies on
    held = frozenset(redact._all_references(node)) & removed
    assert repr(redact._prune_references(node, held)) == repr(pruned)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_json_copy_is_a_deep_copy(node: Any) -> None:
    copied = redact._copy_json(node)
    assert repr(copied) == repr(copy.deepcopy(node))
    if isinstance(node, dict | list) and node:
        assert copied is not node


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abc*. é", max_size=4), min_size=1, max_size=6),
    st.lists(st.text(alphabet="abc*. _é-", max_size=12), max_size=8),
)
def test_stem_trie_matches_where_the_alternation_does(stems: list[str], texts: list[str]) -> None:
    plain = re.compile(r"\b(?:" + "|".join(map(re.escape, stems)) + ")")
    trie = re.compile(r"\b" + _trie(stems))
    for text in texts:
        assert bool(trie.search(text)) == bool(plain.search(text))


def test_every_mapping_lexicon_scans_fixture_text_as_before() -> None:
    scanner = redact.scanner_from(mappings())
    lexicons: list[Lexicon] = [scanner._terms, *rules_from(mappings()).compiled.lexicons.values()]
    texts = [fold(line) for path in FIXTURES.rglob("*.xml") for line in path.read_text(errors="replace").splitlines()]
    for lexicon in lexicons:
        if not lexicon._stems:
            continue
        plain = re.compile(r"\b(?:" + "|".join(map(re.escape, lexicon._stems)) + ")")
        assert lexicon._stem_re is not None
        for text in texts:
            assert bool(lexicon._stem_re.search(text)) == bool(plain.search(text))


def _dump(cut: Cut) -> bytes:
    view = cut.view
    return orjson.dumps(
        [cut.message, cut.event, view.resources, [repr(w) for w in view.withheld], sorted(view.changed)],
        option=orjson.OPT_SORT_KEYS,
    )


def test_a_letter_cut_from_many_threads_is_cut_as_from_one() -> None:
    settings_ = Settings()
    consents = store("consents-s6.json")

    def letter() -> Any:
        return prepare(S6.read_bytes(), name=S6.name, mappings=mappings(), settings=settings_, now=AT)

    reference = letter()
    routed = route(reference.resources, directory(), reference.policy).routed
    expected = {r.recipient.id: _dump(cut_for(reference, r, AT, consents, settings_)) for r in routed}
    shared = letter()  # a fresh letter, its memos filled by racing threads
    jobs = [r for _ in range(8) for r in routed]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda r: (r.recipient.id, _dump(cut_for(shared, r, AT, consents, settings_))), jobs))
    assert all(expected[rid] == dump for rid, dump in found)
    # the translated resources are untouched, and the mapping set's scanner remembered nothing
    assert orjson.dumps(shared.resources) == orjson.dumps(reference.resources)
    base = redact.scanner_from(mappings())
    assert not base._by_rules and not base._pruned and not base._references and not base._shared


def test_memos_belong_to_their_letter() -> None:
    one = prepare(S6.read_bytes(), name=S6.name, mappings=mappings(), settings=Settings(), now=AT)
    two = prepare(S6.read_bytes(), name=S6.name, mappings=mappings(), settings=Settings(), now=AT)
    assert one.scanner is not two.scanner
    routed = route(one.resources, directory(), one.policy).routed
    for item in routed:
        cut_for(one, item, AT, store("consents-s6.json"), Settings())
    assert one.scanner._by_rules and not two.scanner._by_rules


def test_seal_signs_what_joserfc_would_sign() -> None:
    signer = seal.Signer(seal.generate_key())
    bundle = {"resourceType": "Bundle", "id": "x", "entry": [{"text": "é" * n} for n in range(50)]}
    sealed = seal.sign(bundle, signer, "2026-11-16T09:00:00+01:00")
    detached = seal.base64.b64decode(sealed["signature"]["data"]).decode()
    head, empty, signature = detached.split(".")
    assert empty == ""
    compact = jws.serialize_compact(
        {"alg": "ES256", "kid": signer.kid, "typ": "application/fhir+json"},
        seal.canonical(bundle),
        signer.key,
        algorithms=["ES256"],
    )
    assert compact.split(".")[0] == head  # the same protected header, byte for byte
    jws.deserialize_compact(f"{head}..{signature}", signer.key, algorithms=["ES256"], payload=seal.canonical(bundle))
    assert seal.verify(sealed, [signer.key]) == signer.kid
