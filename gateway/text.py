"""Text folding shared by every stage that compares human-written words (drug names, headers, lexicons)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

__all__ = ["Lexicon", "fold", "fold_joined", "strings_in"]


@lru_cache(maxsize=8)
def _separator(keep: str) -> re.Pattern[str]:
    return re.compile(f"[^a-z0-9{re.escape(keep)}]+")


# fold without ``keep`` on bytes: upper case to lower, every byte but [a-z0-9] to a space (then split
# and joined by single spaces), one C pass each instead of a regex substitution (several times slower)
_FOLD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))
_FOLDED_ALPHABET = b" 0123456789abcdefghijklmnopqrstuvwxyz"  # what a folded text is made of
_SPACE_RUNS = re.compile(b"  +")


def fold(text: str, keep: str = "") -> str:
    """Lower case, accents removed, punctuation as single spaces: 'Voie admin.' → 'voie admin'.

    Characters in ``keep`` survive (the label lexicons keep '*' to mark a stem).
    """
    # the same as _fold_plain(text, keep): NFKD leaves ASCII alone, the words are the runs of [a-z0-9]
    # (and of the kept characters)
    table = _fold_table(keep) if keep else _FOLD_BYTES
    if table is None:
        return _fold_plain(text, keep)
    ascii_text = (
        text.encode("ascii") if text.isascii() else unicodedata.normalize("NFKD", text).encode("ascii", "ignore")
    )
    data = ascii_text.translate(table)  # spaces are the only whitespace left
    if len(data) > 96:  # long text: collapse the runs of spaces in C rather than split into words
        return _SPACE_RUNS.sub(b" ", data).strip(b" ").decode("ascii")
    return b" ".join(data.split()).decode("ascii")


def fold_joined(strings: Iterable[str]) -> str:
    """``fold(" ".join(strings))``, normalising only the strings that are not ASCII.

    NFKD works character by character and never reorders across a space, so the normalised join is
    the join of the normalised strings; most of a resource's strings (codes, ids, dates) are ASCII.
    """
    text = " ".join([s if s.isascii() else unicodedata.normalize("NFKD", s) for s in strings])
    data = text.encode("ascii", "ignore").translate(_FOLD_BYTES)
    if len(data) > 96:
        return _SPACE_RUNS.sub(b" ", data).strip(b" ").decode("ascii")
    return b" ".join(data.split()).decode("ascii")


@lru_cache(maxsize=8)
def _fold_table(keep: str) -> bytes | None:
    """The byte table of fold(text, keep); None when ``keep`` has a non-ASCII or a whitespace character
    (those change what separates words: the regex definition handles them)."""
    if not keep.isascii() or any(c.isspace() for c in keep):
        return None
    kept = keep.lower().encode("ascii")  # the text is lowered before the kept characters are looked at
    return bytes(b if b in kept and not 65 <= b <= 90 else _FOLD_BYTES[b] for b in range(256))


def _fold_plain(text: str, keep: str = "") -> str:
    """The definition of :func:`fold` (kept for ``keep`` and for the tests that prove the fast path)."""
    if text.isascii():
        ascii_text = text.lower()
    else:
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _separator(keep).sub(" ", ascii_text).strip()


def _is_folded(text: str) -> bool:
    """Whether the text is what :func:`fold` returns: words of [a-z0-9] joined by single spaces."""
    return (
        text.isascii()
        and not text.encode("ascii").translate(None, _FOLDED_ALPHABET)
        and "  " not in text
        and not text.startswith(" ")
        and not text.endswith(" ")
    )


class Lexicon:
    """A term list matched on folded text by words, not by regex alternation (hundreds of terms, fast).

    A term matches whole words or a whole phrase, with an optional plural s/x on its last word;
    ``stem*`` matches any word starting with the stem.  Terms are folded once, here.
    """

    __slots__ = ("_any", "_first_words", "_longest", "_phrases", "_stem_re", "_stems", "_words")

    _any: re.Pattern[str] | bool | None  # False: not made yet (see _fast)

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
        self._any = False  # made at the first hit() that can use it (a letter's drug lexicon may never)

    def _fast(self) -> re.Pattern[str] | None:
        """:meth:`hit` as one regex search, for text as fold() returns it (words joined by single spaces).

        A word or phrase is " term" in " " + text followed by a space or the end, a stem is " stem" (a
        word starts after a space).  The pattern starts with a literal space, which re scans for in C,
        and the terms share their prefixes: one pass instead of splitting the text, hashing every token
        twice and trying the stem alternation at every position.  None when the lexicon is empty or has
        an empty stem ('*': any word boundary): those keep the general path.
        """
        found = self._any
        if found is False:
            found = self._any = (
                re.compile(" " + _terms_trie(self._words | self._phrases, self._stems))
                if (self._words or self._phrases or self._stems) and all(self._stems)
                else None
            )
        return found if isinstance(found, re.Pattern) else None

    def _phrase_spans(self, tokens: list[str]) -> Iterator[tuple[int, int]]:
        for i, token in enumerate(tokens):
            if token in self._first_words:
                for n in range(2, self._longest + 1):
                    if i + n <= len(tokens) and " ".join(tokens[i : i + n]) in self._phrases:
                        yield i, i + n

    def hit(self, folded: str, tokens: list[str] | None = None) -> bool:
        """Whether the folded text contains a term (``tokens``: its words, when already split)."""
        if tokens is None and _is_folded(folded):
            fast = self._fast()
            if fast is not None:
                return fast.search(" " + folded) is not None
        return self._hit_tokens(folded, folded.split() if tokens is None else tokens)

    def hit_folded(self, folded: str) -> bool:
        """:meth:`hit` for text that fold() returned (words of [a-z0-9] joined by single spaces), unchecked."""
        fast = self._fast()
        if fast is not None:
            return fast.search(" " + folded) is not None
        return self._hit_tokens(folded, folded.split())

    def _hit_tokens(self, folded: str, tokens: list[str]) -> bool:
        """The definition of :meth:`hit`, on any text: words, then stems, then phrases."""
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


_WHOLE_END = "<end>"  # tree keys that no character can be (a term may contain '*' or any character)
_STEM_END = "<stem>"


def _terms_trie(whole: Iterable[str], stems: Iterable[str]) -> str:
    """A regex matching at the start of a whole term (then a space or the end) or of a stem.

    Factored by common prefix like :func:`_trie`; a stem makes the longer terms it begins redundant,
    a whole term does not (its end must be followed by a space or the end of the text).
    """
    tree: dict[str, Any] = {}
    for term, end in (*((t, _WHOLE_END) for t in whole), *((t, _STEM_END) for t in stems)):
        node = tree
        for char in term:
            node = node.setdefault(char, {})
        node[end] = {}

    def branch(node: dict[str, Any]) -> str:
        chain = ""
        while len(node) == 1 and _WHOLE_END not in node and _STEM_END not in node:  # no choice here: no group
            char, node = next(iter(node.items()))
            chain += re.escape(char)
        if _STEM_END in node:  # a stem ends here: whatever follows, it matches
            return chain
        alternatives = [re.escape(char) + branch(rest) for char, rest in sorted(node.items()) if char != _WHOLE_END]
        if _WHOLE_END in node:
            alternatives.append("(?![^ ])")  # the term ends here: a space or the end of the text follows
        return chain + (alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")")

    return branch(tree)


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
    """Every string value under a JSON-shaped node, keys in ``skip`` excluded (iterative: a hot path).

    The order is the one of a stack walk (the last value of an object or array first), which the
    labels depend on: their lexicons match phrases across neighbouring strings.
    """
    out: list[str] = []
    append = out.append
    stack: list[Any] = [node]
    pop = stack.pop
    push = stack.append
    while stack:
        item = pop()
        kind = type(item)  # the exact JSON types first; subclasses (StrEnum...) take the slower checks
        if kind is str:
            append(item)
        elif kind is dict:
            for key, value in item.items():
                if key not in skip:
                    push(value)
        elif kind is list:
            stack.extend(item)
        elif isinstance(item, str):
            append(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in skip)
        elif isinstance(item, list):
            stack.extend(item)
    return out
