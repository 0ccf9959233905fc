"""Names the mapping tables may use for section translators.

Each adapter (CDA, FHIR document) implements every name; ``tests/unit/test_mappings.py`` checks it,
and :func:`gateway.mappings.load_mappings` refuses a table naming anything else.
"""

from __future__ import annotations

__all__ = ["SECTION_TRANSLATORS"]

SECTION_TRANSLATORS = frozenset(
    {
        "allergies",
        "devices",
        "document_status",
        "medications",
        "narrative",
        "plan",
        "stay_observations",
        "subsections",
    }
)
