"""``gateway demo``: run the pipeline on the embedded sample letters and show what each recipient gets.

Each sample letter is translated (its Bundle written, its change table printed); two scenarios are
dispatched offline to show who receives what and what is withheld; then the same two letters go over
the network: a gateway (API + delivery worker) and a reference receiver run on loopback, the letters
are pushed with ``POST /letters``, delivered signed over FHIR ``$process-message``, acknowledged, and
each recipient's status, what it received and the audit trail are shown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.mappings import Mappings
from gateway.pipeline import translate_letter
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.store import ResourceStore

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


def seed_store(
    store: ResourceStore,
    address: Callable[[str], str],
    consents: Sequence[str] = ("consents-s1.json",),
    *,
    endpoint: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """The sample directory with every Endpoint moved to ``address(endpoint id)`` (FHIR messaging), and the
    sample consents, each version valid from its ``meta.lastUpdated`` — what the demo and the tests run
    against; ``endpoint`` may change each Endpoint further (a published certificate...)."""
    import copy
    from datetime import datetime

    import orjson

    base = samples_dir() / "dispatch"
    for entry in orjson.loads((base / "directory.json").read_bytes())["entry"]:
        res = copy.deepcopy(entry["resource"])
        if res["resourceType"] == "Endpoint":
            res["address"] = address(res["id"])
            res["connectionType"]["code"] = "hl7-fhir-msg"
            if endpoint is not None:
                endpoint(res)
        store.put(res["resourceType"], res["id"], res)
    for name in consents:
        for entry in orjson.loads((base / name).read_bytes())["entry"]:
            res = entry["resource"]
            store.put("Consent", res["id"], res, at=datetime.fromisoformat(res["meta"]["lastUpdated"]))


def social_permit(status: str = "active", rid: str = "social-permit") -> dict[str, Any]:
    """A Consent of the S6 patient letting actors outside the care team (social worker, home help)
    receive logistics and social data — what the load benchmark and the tests of send-time consent use."""
    category = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
    return {
        "resourceType": "Consent",
        "id": rid,
        "status": status,
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "248057511410235"}},
        "dateTime": "2026-10-28T15:00:00+01:00",
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "https://fhir.discharge-gateway.fr/CodeSystem/actor-kind",
                                "code": "outside-care-team",
                            }
                        ]
                    },
                    "reference": {"display": "hors équipe de soins"},
                }
            ],
            "securityLabel": [{"system": category, "code": "logistics"}, {"system": category, "code": "social"}],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "COC"}],
        },
    }


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
    _network_demo(mappings, settings, out_dir / "network")
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


def _serve_in_thread(app: object, port: int) -> object:
    import threading
    import time

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"demo server on port {port} did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _network_demo(mappings: Mappings, settings: Settings, out_dir: Path) -> None:
    """Gateway + reference receiver on loopback: push, deliver, acknowledge, show statuses and audit."""
    import secrets
    import shutil
    import threading
    import time

    import httpx
    import orjson
    from sqlalchemy import text

    from gateway.api.app import create_app
    from gateway.deliver import Deliverer, RetryPolicy
    from gateway.outbox import Outbox
    from gateway.receiver import create_receiver
    from gateway.seal import Signer, generate_key
    from gateway.store import ResourceStore, make_engine
    from gateway.transports.http import HttpTransport

    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "received").mkdir(parents=True)
    base = samples_dir()
    signer = Signer(generate_key())
    rx_port, gw_port = _free_port(), _free_port()
    receiver = _serve_in_thread(
        create_receiver(
            f"sqlite:///{out_dir / 'receiver.db'}", [signer.key], endpoint=f"http://127.0.0.1:{rx_port}/fhir"
        ),
        rx_port,
    )
    engine = make_engine(f"sqlite:///{out_dir / 'gateway.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine, signer)
    seed_store(store, lambda ep: f"http://127.0.0.1:{rx_port}/fhir/{ep}", ("consents-s1.json", "consents-s6.json"))
    key = secrets.token_urlsafe(24)
    demo_settings = Settings(
        max_document_bytes=settings.max_document_bytes,
        default_timezone=settings.default_timezone,
        public_url=f"http://127.0.0.1:{gw_port}",
        api_keys={key: frozenset({"his", "auditor"})},
    )
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings,
        settings=demo_settings,
        signer=signer,
        transports={"http": HttpTransport(timeout=5.0)},
        retry=RetryPolicy(max_attempts=3, initial=0.5, maximum=2.0),
    )
    threading.Thread(target=worker.run_forever, kwargs={"idle": 0.1}, daemon=True).start()
    gateway = _serve_in_thread(create_app(demo_settings, store, outbox, mappings, on_accepted=worker.remember), gw_port)
    auth = {"Authorization": f"Bearer {key}"}
    _out(
        "== Sur le réseau, aujourd'hui : le consentement en vigueur à l'envoi décide (S6 : la version 2 du 15/11 "
        "autorise le SAAD pour la logistique, le CLIC reste exclu)"
    )
    _out(
        f"   passerelle http://127.0.0.1:{gw_port} (API, OpenAPI sur /docs) → destinataire de référence http://127.0.0.1:{rx_port}"
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{gw_port}", headers=auth, timeout=30) as client:
            for letter in ("dispatch/ldl-ses-s1-pharmacy.xml", "dispatch/ldl-ses-s6-objection.xml"):
                started = time.perf_counter()
                answer = client.post(
                    "/letters",
                    content=(base / letter).read_bytes(),
                    headers={"Content-Type": "application/hl7-cda+xml"},
                )
                body = answer.json()
                _out(f"   POST /letters {Path(letter).name} → {answer.status_code} {body.get('status', body)}")
                status: dict[str, object] = {}
                for _ in range(300):
                    status = client.get(str(body["status"])).json()
                    if all(d["status"] not in ("queued", "sending") for d in status["deliveries"]):  # type: ignore[attr-defined]
                        break
                    time.sleep(0.05)
                elapsed = (time.perf_counter() - started) * 1000
                events = outbox.audit_events(str(body["letterId"]))
                for d in status["deliveries"]:  # type: ignore[attr-defined]
                    ref = d["recipient"].replace("-", "/", 1)  # Organization-x → Organization/x
                    mine = [
                        e
                        for e in events
                        if any(a.get("who", {}).get("reference", "").endswith(ref) for a in e["agent"])
                    ]
                    held = sum(
                        1
                        for e in mine
                        for ent in e.get("entity", [])
                        if ent.get("description", "").startswith("withheld")
                    )
                    basis = sorted(
                        {
                            ent["what"]["reference"]
                            for e in mine
                            for ent in e.get("entity", [])
                            if ent.get("what", {}).get("reference", "").startswith("Consent/")
                        }
                    )
                    when = str(d["acknowledged"] or d["updated"])[11:23]
                    why = ", ".join(basis) or d["lastError"] or "équipe de soins"
                    _out(f"   {d['recipient'][:34]:34} {d['status']:13} {when}  retenus : {held:3}  ({why})")
                _out(f"   audit : {len(events)} AuditEvent(s) ; poussé → tout acquitté ou retenu en {elapsed:.0f} ms")
                (out_dir / f"audit-{Path(letter).stem}.json").write_bytes(
                    orjson.dumps(events, option=orjson.OPT_INDENT_2)
                )
        rx = make_engine(f"sqlite:///{out_dir / 'receiver.db'}")
        with rx.connect() as conn:
            for row in conn.execute(text("SELECT message_id, body FROM received_message")):
                message = orjson.loads(row.body)
                name = message["entry"][0]["resource"]["destination"][0]["receiver"]["reference"].rsplit("/", 1)[-1]
                (out_dir / "received" / f"{name}-{row.message_id[:8]}.json").write_bytes(
                    orjson.dumps(message, option=orjson.OPT_INDENT_2)
                )
        rx.dispose()
        _out(f"   → {out_dir}/received/ (ce que chaque destinataire a reçu, signé) et {out_dir}/audit-*.json")
        _out()
    finally:
        worker.stop()
        for server in (gateway, receiver):
            server.should_exit = True  # type: ignore[attr-defined]
        worker.close()
        engine.dispose()
