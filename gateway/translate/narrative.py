"""Generated XHTML narratives (``Resource.text``) and the GP's readable summary.

Every string that reaches XHTML goes through :func:`esc`; nothing from the letter's own narrative
markup is copied, only its text, so a ``<script>`` in a CDA table can never reach a rendered page.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["dl", "esc", "generated", "para", "table"]

XHTML_NS = "http://www.w3.org/1999/xhtml"


def esc(text: object) -> str:
    """``html.escape(str(text), quote=True)``, inlined (the narratives escape a few hundred strings a letter)."""
    value = text if type(text) is str else str(text)
    if "&" in value or "<" in value or ">" in value or '"' in value or "'" in value:
        return (
            value.replace("&", "&amp;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
            .replace('"', "&quot;")
            .replace("'", "&#x27;")
        )
    return value  # (most text: nothing to escape, five scans instead of five replacements)


def para(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def dl(pairs: Iterable[tuple[str, str | None]]) -> str:
    """Label/value lines for a resource summary (values may be None: skipped)."""
    items = "".join(f"<li><b>{esc(k)}</b> : {esc(v)}</li>" for k, v in pairs if v)
    return f"<ul>{items}</ul>" if items else ""


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], caption: str | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def generated(*blocks: str) -> dict[str, str]:
    """A FHIR Narrative with status ``generated`` wrapping the given XHTML blocks."""
    inner = "".join(b for b in blocks if b) or "<p>(vide)</p>"
    return {"status": "generated", "div": f'<div xmlns="{XHTML_NS}">{inner}</div>'}
