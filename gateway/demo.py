"""``gateway demo``: run the pipeline on the embedded sample letters and show what each recipient gets.

Each sample letter is translated (its Bundle written, its change table printed), then two scenarios are
dispatched to show who receives what and what is withheld (the delivery issue extends the demo to the
network).
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
    _dispatch_demo(mappings, settings, out_dir)
    _out(f"Bundles written to {out_dir}/ — try `gateway translate LETTER [--prior PRIOR]` or `gateway dispatch` next.")
    return 0


def _dispatch_demo(mappings: Mappings, settings: Settings, out_dir: Path) -> None:
    """S1 and S6 dispatched: who receives what, and what is withheld (no network yet)."""
    from datetime import datetime

    import orjson

    from gateway.consent import MemoryConsentStore
    from gateway.directory import load_directory
    from gateway.pipeline import dispatch_letter
    from gateway.policy import policy_from

    base = samples_dir()
    directory = load_directory(orjson.loads((base / "dispatch" / "directory.json").read_bytes()), policy_from(mappings))
    runs = (
        (
            "S1 — sortie à domicile : médecin traitant, IDE, pharmacien, SAAD, CCAS, cardiologue",
            "dispatch/ldl-ses-s1-pharmacy.xml",
            "dispatch/consents-s1.json",
            "2026-10-30T11:30:00+01:00",
        ),
        (
            "S6 — la patiente s'oppose au partage avec les acteurs sociaux",
            "dispatch/ldl-ses-s6-objection.xml",
            "dispatch/consents-s6.json",
            "2026-11-05T11:30:00+01:00",
        ),
    )
    for title, letter, consents, instant in runs:
        store = MemoryConsentStore()
        store.load_bundle(orjson.loads((base / consents).read_bytes()))
        result = dispatch_letter(
            (base / letter).read_bytes(),
            name=Path(letter).name,
            mappings=mappings,
            settings=settings,
            directory=directory,
            consents=store,
            at=datetime.fromisoformat(instant),
        )
        target = out_dir / Path(letter).stem
        target.mkdir(parents=True, exist_ok=True)
        for recipient_id, message in result.messages.items():
            (target / f"{recipient_id}.json").write_bytes(orjson.dumps(message, option=orjson.OPT_INDENT_2))
        (target / "audit.json").write_bytes(orjson.dumps(result.audit, option=orjson.OPT_INDENT_2))
        _out(f"== {title}")
        for recipient_id, decision in result.decisions.items():
            view = result.views[recipient_id]
            allowed = ", ".join(sorted(decision.categories)) or "rien"
            basis = ", ".join(decision.consents) or ("équipe de soins" if decision.care_team else "pas de consentement")
            sent = "message" if recipient_id in result.messages else "AUCUN ENVOI"
            _out(
                f"   {view.recipient.display[:46]:46} {sent:11} reçoit : {allowed:26} retenus : {len(view.withheld):3}  ({basis})"
            )
        for event in result.routing.events:
            _out(f"   ! {event.kind}: {event.text}")
        _out(f"   → {target}/ (un message par destinataire + audit.json)")
        _out()
