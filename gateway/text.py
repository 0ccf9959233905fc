"""Text folding shared by every stage that compares human-written words (drug names, headers, lexicons)."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

__all__ = ["fold"]

@lru_cache(maxsize=8)
def _separator(keep: str) -> re.Pattern[str]:
    return re.compile(f"[^a-z0-9{re.escape(keep)}]+")


def fold(text: str, keep: str = "") -> str:
    """Lower case, accents removed, punctuation as single spaces: 'Voie admin.' → 'voie admin'.

    Characters in ``keep`` survive (the label lexicons keep '*' to mark a stem).
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _separator(keep).sub(" ", ascii_text).strip()
