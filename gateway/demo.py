"""``gateway demo``: run the pipeline on the embedded sample letters and show what the GP receives.

For now the pipeline ends at translation (the delivery issue extends the demo to the network): each
sample is translated, its Bundle written to the output directory, and the change table printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.mappings import Mappings
from gateway.pipeline import translate_letter
from gateway.settings import Settings

__all__ = ["SAMPLES", "run_demo", "samples_dir"]

# (title, letter, priors) — paths relative to the samples directory
SAMPLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("S1 — lettre de sortie CI-SIS 2022.01, sans liste d'admission", "cda/ldl-ses-s1-2022.xml", ()),
    ("S1 — la même, comparée à la lettre d'entrée (LDL-EES)", "cda/ldl-ses-s1-2022.xml", ("cda/ldl-ees-s1-2022.xml",)),
    ("S8 — médicament innovant, comparé au VSM du médecin traitant", "cda/ldl-ses-s8-2020.xml", ("cda/vsm-s8.xml",)),
    ("S1 — document FHIR (Composition) comparé à une List FHIR", "fhir/document-s1.json", ("fhir/prior-list-s1.json",)),
)


def samples_dir() -> Path:
    packaged = Path(__file__).parent / "_data" / "samples"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def run_demo(mappings: Mappings, settings: Settings, out_dir: Path) -> int:
    base = samples_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (title, letter, priors) in enumerate(SAMPLES, start=1):
        path = base / letter
        result = translate_letter(
            path.read_bytes(),
            name=path.name,
            mappings=mappings,
            settings=settings,
            prior=[((base / p).read_bytes(), Path(p).name) for p in priors],
        )
        target = out_dir / f"{index}-{path.stem}.json"
        target.write_bytes(result.json() + b"\n")
        _out(f"== {title}")
        _out(f"   {path.name}" + (f" + {', '.join(Path(p).name for p in priors)}" if priors else ""))
        _out(f"   → {target} ({len(result.bundle['entry'])} resources)")
        rows = [
            (
                c.line.name,
                c.before.dosage_text() if c.before else "—",
                c.after.dosage_text() if c.after else "—",
                f"{c.status.value} ({c.basis.value})",
                c.reason or "—",
            )
            for c in result.translation.built.changes
        ]
        widths = [min(max((len(r[i]) for r in rows), default=4), cap) for i, cap in enumerate((30, 28, 28, 22, 40))]
        header = ("Médicament", "Avant", "Après", "Changement", "Motif")
        for row in (header, *rows):
            _out("   " + " | ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(row)))
        for issue in result.issues:
            _out(f"   ! {issue.severity}: {issue.text}")
        _out()
    _out(
        f"Bundles written to {out_dir}/ — open one, or run `gateway translate LETTER [--prior PRIOR]` on your own letter."
    )
    return 0
