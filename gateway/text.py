"""Text folding shared by every stage that compares human-written words (drug names, headers, lexicons)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

__all__ = ["Lexicon", "fold", "strings_in"]


@lru_cache(maxsize=8)
def _separator(keep: str) -> re.Pattern[str]:
    return re.compile(f"[^a-z0-9{re.escape(keep)}]+")


_SEPARATOR = _separator("")  # the usual one, without the cache's call


def fold(text: str, keep: str = "") -> str:
    """Lower case, accents removed, punctuation as single spaces: 'Voie admin.' → 'voie admin'.

    Characters in ``keep`` survive (the label lexicons keep '*' to mark a stem).
    """
    if text.isascii():
        ascii_text = text.lower()
    else:
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return (_separator(keep) if keep else _SEPARATOR).sub(" ", ascii_text).strip()


class Lexicon:
    """A term list matched on folded text by words, not by regex alternation (hundreds of terms, fast).

    A term matches whole words or a whole phrase, with an optional plural s/x on its last word;
    ``stem*`` matches any word starting with the stem.  Terms are folded once, here.
    """

    __slots__ = ("_first_words", "_longest", "_phrases", "_stem_re", "_stems", "_words")

    def __init__(self, terms: Iterable[str]) -> None:
        words: set[str] = set()
        phrases: set[str] = set()
        stems: list[str] = []
        for term in terms:
            folded = fold(term, keep="*")
            if not folded:
                continue
            if folded.endswith("*"):
                stem = folded[:-1].strip()
                if " " in stem:  # a multi-word stem: matched as a phrase
                    phrases.add(stem)
                else:
                    stems.append(stem)
                continue
            target = phrases if " " in folded else words
            target.update((folded, f"{folded}s", f"{folded}x"))
        self._words = frozenset(words)
        self._phrases = frozenset(phrases)
        self._first_words = frozenset(p.split(" ", 1)[0] for p in phrases)
        self._stems = tuple(stems)
        self._stem_re = re.compile(r"\b" + _trie(stems)) if stems else None
        self._longest = max((p.count(" ") + 1 for p in phrases), default=1)

    def _phrase_spans(self, tokens: list[str]) -> Iterator[tuple[int, int]]:
        for i, token in enumerate(tokens):
            if token in self._first_words:
                for n in range(2, self._longest + 1):
                    if i + n <= len(tokens) and " ".join(tokens[i : i + n]) in self._phrases:
                        yield i, i + n

    def hit(self, folded: str, tokens: list[str] | None = None) -> bool:
        """Whether the folded text contains a term (``tokens``: its words, when already split)."""
        tokens = folded.split() if tokens is None else tokens
        if not self._words.isdisjoint(tokens):
            return True
        if self._stem_re is not None and self._stem_re.search(folded):
            return True
        # a phrase needs its first word: one set operation rules out most text
        return not self._first_words.isdisjoint(tokens) and next(self._phrase_spans(tokens), None) is not None

    def remove(self, folded: str) -> str:
        """The folded text without the words of every term it contains."""
        tokens = folded.split()
        gone = {i for i, t in enumerate(tokens) if t in self._words or (self._stems and t.startswith(self._stems))}
        for start, end in self._phrase_spans(tokens):
            gone.update(range(start, end))
        return " ".join(t for i, t in enumerate(tokens) if i not in gone) if gone else folded


def _trie(words: Iterable[str]) -> str:
    """A regex matching where one of the words starts, factored by common prefix.

    Python's ``re`` tries the branches of an alternation one by one at every position: sharing their
    prefixes ('cardio|cancer' → 'ca(?:rdio|ncer)') makes the usual miss several times cheaper.  Only
    whether (not which) a word matches is asked, so a word makes the longer ones it begins redundant.
    """
    tree: dict[str, Any] = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def branch(node: dict[str, Any]) -> str:
        chain = ""
        while len(node) == 1 and "" not in node:  # no choice here: no group (nor a call)
            char, node = next(iter(node.items()))
            chain += re.escape(char)
        if "" in node:  # a word ends here: whatever follows, it matches
            return chain
        alternatives = [re.escape(char) + branch(rest) for char, rest in sorted(node.items())]
        return chain + "(?:" + "|".join(alternatives) + ")"

    return branch(tree)


def strings_in(node: object, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every string value under a JSON-shaped node, keys in ``skip`` excluded (iterative: a hot path)."""
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
