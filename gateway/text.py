"""Text folding shared by every stage that compares human-written words (drug names, headers, lexicons)."""

from __future__ import annotations

import unicodedata

__all__ = ["fold"]


def fold(text: str, keep: str = "") -> str:
    """Lower case, accents removed, punctuation as single spaces: 'Voie admin.' → 'voie admin'.

    Characters in ``keep`` survive (the label lexicons keep '*' to mark a stem).
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join("".join(ch if ch.isalnum() or ch in keep else " " for ch in ascii_text).split())
