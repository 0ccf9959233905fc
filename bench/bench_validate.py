"""How much faster is gateway.validate than validating through the fhir.resources R4B models?

Builds the resources of a realistic French discharge letter (≈30 resources: patient, professionals,
stay, ten medication statements with dosage and change extensions, the medication-change List,
CarePlan, Communication, Observation, AllergyIntolerance, a DocumentReference carrying the original
document as 60 KB of base64, Provenance, RelatedPerson...) and prints the median time of
``problems()`` and of ``check_with_models()`` over the whole letter, and their ratio.

    .venv/bin/python bench/bench_validate.py [--runs N]

``build_letter()`` is also used by tests/unit/test_validate.py as its set of valid resources.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.validate import check_with_models, problems

Json = dict[str, Any]

PROJECT = "https://fhir.discharge-gateway.fr"
XHTML = "http://www.w3.org/1999/xhtml"
INS_OID = "urn:oid:1.2.250.1.213.1.4.8"
RPPS_OID = "urn:oid:1.2.250.1.71.4.2.1"
FINESS_OID = "urn:oid:1.2.250.1.71.4.2.2"
CS_FLAG = "urn:oid:1.2.36.1.2001.1001.101.104.16592"
EXT_CHANGE = f"{PROJECT}/StructureDefinition/medication-change"
CS_INTEROP = "https://hl7.fr/ig/fhir/medication/CodeSystem/fr-medication-reconciliation-status"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RECORDED = "2024-03-14T16:42:07.318+01:00"


def urn(rid: str) -> str:
    return f"urn:uuid:{rid}"


def rid(n: int) -> str:
    return f"6f1c2a7e-4b3d-4c8e-9a1f-{n:012d}"


def div(*rows: tuple[str, str]) -> Json:
    items = "".join(f"<li><b>{k}</b> : {v}</li>" for k, v in rows)
    return {"status": "generated", "div": f'<div xmlns="{XHTML}"><ul>{items}</ul></div>'}


def meta() -> Json:
    return {
        "profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient"],
        "security": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": "R",
                "display": "restricted",
            },
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"},
        ],
    }


def ref(resource: Json, display: str | None = None) -> Json:
    out: Json = {"reference": urn(resource["id"])}
    if display:
        out["display"] = display
    return out


def new(kind: str, n: int) -> Json:
    return {"resourceType": kind, "id": rid(n), "meta": meta()}


def telecom(phone: str, email: str | None = None) -> list[Json]:
    out: list[Json] = [{"system": "phone", "value": phone, "use": "work"}]
    if email:
        out.append({"system": "email", "value": email, "use": "work"})
    return out


def address(line: str, city: str, postal: str) -> Json:
    return {"use": "work", "line": [line], "city": city, "postalCode": postal, "country": "FR"}


def organization(n: int, name: str, finess: str, city: str) -> Json:
    org = new("Organization", n)
    org["identifier"] = [{"system": FINESS_OID, "value": finess}]
    org["active"] = True
    org["type"] = [{"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R66", "code": "SA01"}]}]
    org["name"] = name
    org["telecom"] = telecom("+33 4 72 11 00 00")
    org["address"] = [address("103 grande rue de la Croix-Rousse", city, "69004")]
    org["text"] = div(("Organisation", name), ("FINESS", finess))
    return org


def practitioner(n: int, family: str, given: str, rpps: str) -> Json:
    res = new("Practitioner", n)
    res["identifier"] = [
        {
            "type": {"coding": [{"system": "http://interopsante.org/CodeSystem/v2-0203", "code": "RPPS"}]},
            "system": RPPS_OID,
            "value": rpps,
        }
    ]
    res["active"] = True
    res["name"] = [
        {
            "use": "official",
            "family": family,
            "given": [given],
            "prefix": ["Dr"],
            "text": f"Dr {given} {family}",
        }
    ]
    res["telecom"] = telecom("+33 4 72 11 12 13", f"{given.lower()}.{family.lower()}@chu-lyon.fr")
    res["text"] = div(("Professionnel", f"Dr {given} {family}"), ("RPPS", rpps))
    return res


def role(n: int, who: Json, org: Json, code: str, label: str) -> Json:
    res = new("PractitionerRole", n)
    res["active"] = True
    res["practitioner"] = ref(who, who["name"][0]["text"])
    res["organization"] = ref(org, org["name"])
    res["code"] = [{"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_G15", "code": code}], "text": label}]
    res["text"] = div(("Professionnel", who["name"][0]["text"]), ("Rôle", label))
    return res


MEDICATIONS = [
    ("C07AB07", "Bisoprolol 2,5 mg comprimé", 1, "d", ["MORN"], 1, "{tbl}", "poursuivi", "unchanged"),
    (
        "C03CA01",
        "Furosémide 40 mg comprimé",
        2,
        "d",
        ["MORN", "NOON"],
        1,
        "{tbl}",
        "dose augmentée",
        "changed",
    ),
    ("B01AF02", "Apixaban 5 mg comprimé pelliculé", 2, "d", ["MORN", "EVE"], 1, "{tbl}", "nouveau", "new"),
    ("C10AA05", "Atorvastatine 40 mg comprimé", 1, "d", ["EVE"], 1, "{tbl}", "poursuivi", "unchanged"),
    ("C09AA05", "Ramipril 5 mg gélule", 1, "d", ["MORN"], 1, "{gel}", "dose diminuée", "changed"),
    ("N02BE01", "Paracétamol 1 g comprimé", 3, "d", ["MORN", "NOON", "EVE"], 1, "{tbl}", "si douleur", "new"),
    (
        "H03AA01",
        "Lévothyroxine sodique 75 µg comprimé",
        1,
        "d",
        ["ACM"],
        1,
        "{tbl}",
        "poursuivi",
        "unchanged",
    ),
    ("A10BA02", "Metformine 1000 mg comprimé", 2, "d", ["CM", "CV"], 1, "{tbl}", "suspendu", "stopped"),
    (
        "A02BC02",
        "Pantoprazole 40 mg comprimé gastro-résistant",
        1,
        "d",
        ["ACM"],
        1,
        "{tbl}",
        "nouveau",
        "new",
    ),
    ("C03DA01", "Spironolactone 25 mg comprimé", 1, "d", ["MORN"], 0.5, "{tbl}", "nouveau", "new"),
]


def statement(n: int, index: int, patient: Json, encounter: Json, med: tuple[Any, ...]) -> Json:
    atc, name, freq, unit, when, dose, dose_unit, label, change = med
    res = new("MedicationStatement", n)
    res["status"] = "stopped" if change == "stopped" else "active"
    res["category"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/medication-statement-category",
                "code": "community",
            }
        ],
        "text": "Traitement à la sortie",
    }
    res["medicationCodeableConcept"] = {
        "coding": [{"system": ATC, "code": atc, "display": name}],
        "text": name,
    }
    res["subject"] = ref(patient)
    res["context"] = ref(encounter)
    res["effectivePeriod"] = {"start": f"2024-03-{index + 2:02d}", "end": "2024-06-14"}
    res["dateAsserted"] = "2024-03-14T16:30:00+01:00"
    res["reasonCode"] = [{"coding": [{"system": SNOMED, "code": "84114007"}], "text": "insuffisance cardiaque"}]
    res["note"] = [{"text": f"{label.capitalize()} à la sortie ; surveillance de la kaliémie à J7."}]
    res["dosage"] = [
        {
            "sequence": 1,
            "text": f"{dose} {'comprimé' if dose_unit == '{tbl}' else 'gélule'} {freq} fois par jour",
            "patientInstruction": "À prendre avec un grand verre d'eau, au cours du repas.",
            "timing": {"repeat": {"frequency": freq, "period": 1, "periodUnit": unit, "when": when}},
            "route": {
                "coding": [{"system": "http://standardterms.edqm.eu", "code": "20053000"}],
                "text": "voie orale",
            },
            "doseAndRate": [{"doseQuantity": {"value": dose, "unit": "comprimé", "system": UCUM, "code": dose_unit}}],
            "maxDosePerPeriod": {
                "numerator": {"value": 4, "unit": "g", "system": UCUM, "code": "g"},
                "denominator": {"value": 1, "unit": "jour", "system": UCUM, "code": "d"},
            },
        }
    ]
    res["extension"] = [
        {
            "url": EXT_CHANGE,
            "extension": [
                {"url": "status", "valueCoding": {"system": CS_INTEROP, "code": change, "display": label}},
                {"url": "basis", "valueCode": "admission-list"},
                {"url": "matchedBy", "valueCode": "atc"},
                {"url": "reason", "valueString": f"Adaptation thérapeutique : {label}."},
                {"url": "note", "valueString": "Décision prise en RCP cardiologie du 12/03/2024."},
            ],
        }
    ]
    res["text"] = div(("Médicament", name), ("Posologie", f"{dose} × {freq}/j"), ("Changement", label))
    return res


def build_letter() -> list[Json]:
    """The resources of one translated letter, valid for the R4B models and for FHIR JSON."""
    out: list[Json] = []
    chu = organization(1, "Hospices Civils de Lyon — Hôpital de la Croix-Rousse", "690781810", "Lyon")
    cabinet = organization(2, "Cabinet médical des Pentes", "690012345", "Lyon")
    patient = new("Patient", 3)
    patient["identifier"] = [
        {
            "use": "official",
            "type": {
                "coding": [{"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203", "code": "INS-NIR"}]
            },
            "system": INS_OID,
            "value": "255086912345678",
        },
        {
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}]},
            "system": "urn:oid:1.2.250.1.71.4.2.7.690781810",
            "value": "IPP0012345",
        },
    ]
    patient["active"] = True
    patient["name"] = [
        {
            "use": "official",
            "family": "Lefèvre",
            "given": ["Hélène", "Marie", "Joséphine"],
            "text": "Hélène Lefèvre",
        },
        {"use": "maiden", "family": "Dubœuf", "given": ["Hélène"], "text": "Hélène Dubœuf"},
    ]
    patient["telecom"] = [{"system": "phone", "value": "+33 6 12 34 56 78", "use": "mobile"}]
    patient["gender"] = "female"
    patient["birthDate"] = "1955-08-12"
    patient["address"] = [
        {
            "use": "home",
            "line": ["12 rue de la République", "Bâtiment B, 3e étage"],
            "city": "Lyon",
            "postalCode": "69002",
            "country": "FR",
        }
    ]
    patient["text"] = div(("Patient", "Hélène Lefèvre"), ("Née le", "12/08/1955"), ("INS", "255086912345678 (INS-NIR)"))
    out.append(patient)
    daughter = new("RelatedPerson", 4)
    daughter["active"] = True
    daughter["patient"] = ref(patient)
    daughter["relationship"] = [
        {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "DAU"}],
            "text": "Fille",
        }
    ]
    daughter["name"] = [{"use": "usual", "family": "Martin", "given": ["Sophie"], "text": "Sophie Martin"}]
    daughter["telecom"] = [{"system": "phone", "value": "+33 6 98 76 54 32", "use": "mobile"}]
    daughter["text"] = div(("Fille", "Sophie Martin"), ("Contact", "+33 6 98 76 54 32"))
    out.append(daughter)
    author = practitioner(5, "Moreau", "Étienne", "10001234567")
    gp = practitioner(6, "Garnier", "Claire", "10007654321")
    signer = practitioner(7, "Rousseau", "Benoît", "10002223334")
    author_role = role(8, author, chu, "SM26", "Cardiologie et maladies vasculaires")
    gp_role = role(9, gp, cabinet, "SM54", "Médecin traitant")
    signer_role = role(10, signer, chu, "SM26", "Chef de service")
    out += [author, author_role, gp, gp_role, signer, signer_role, chu, cabinet]
    patient["generalPractitioner"] = [ref(gp_role, "Dr Claire Garnier")]
    encounter = new("Encounter", 11)
    encounter["identifier"] = [{"system": "urn:oid:1.2.250.1.71.4.2.7.690781810.2", "value": "SEJ-2024-004512"}]
    encounter["status"] = "finished"
    encounter["class"] = {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "IMP",
        "display": "inpatient encounter",
    }
    encounter["type"] = [
        {
            "coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R213", "code": "HC"}],
            "text": "Hospitalisation complète",
        }
    ]
    encounter["subject"] = ref(patient)
    encounter["period"] = {"start": "2024-03-02T09:15:00+01:00", "end": "2024-03-14T15:00:00+01:00"}
    encounter["hospitalization"] = {
        "admitSource": {
            "coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R250", "code": "8"}],
            "text": "Domicile (urgences)",
        },
        "dischargeDisposition": {
            "coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R251", "code": "8"}],
            "text": "Retour au domicile",
        },
    }
    encounter["serviceProvider"] = ref(chu, chu["name"])
    encounter["text"] = div(("Séjour", "du 02/03/2024 au 14/03/2024"), ("Établissement", chu["name"]))
    out.append(encounter)
    statements = [statement(20 + i, i, patient, encounter, med) for i, med in enumerate(MEDICATIONS)]
    out += statements
    changes = new("List", 40)
    changes["status"] = "current"
    changes["mode"] = "changes"
    changes["title"] = "Modifications du traitement médicamenteux"
    changes["code"] = {
        "coding": [
            {
                "system": f"{PROJECT}/CodeSystem/list-code",
                "code": "medication-changes",
                "display": "Medication changes",
            }
        ],
        "text": "Modifications du traitement médicamenteux",
    }
    changes["subject"] = ref(patient)
    changes["encounter"] = ref(encounter)
    changes["date"] = "2024-03-14T16:30:00+01:00"
    changes["source"] = ref(author_role)
    changes["note"] = [{"text": "Liste établie par conciliation médicamenteuse de sortie."}]
    changes["entry"] = [
        {
            "flag": {
                "coding": [
                    {
                        "system": CS_FLAG,
                        "code": "01" if med[8] == "new" else "02",
                        "display": "Change" if med[8] != "new" else "New",
                    }
                ],
                "text": med[7],
            },
            "item": ref(st, med[1]),
        }
        for st, med in zip(statements, MEDICATIONS, strict=True)
    ]
    changes["text"] = div(*((med[1], med[7]) for med in MEDICATIONS))
    out.append(changes)
    heart = new("Observation", 41)
    heart["status"] = "final"
    heart["code"] = {
        "coding": [{"system": LOINC, "code": "10230-1", "display": "Left ventricular Ejection fraction"}],
        "text": "Fraction d'éjection ventriculaire gauche",
    }
    heart["subject"] = ref(patient)
    heart["encounter"] = ref(encounter)
    heart["effectiveDateTime"] = "2024-03-10T11:20:00+01:00"
    heart["valueQuantity"] = {"value": 38.5, "unit": "%", "system": UCUM, "code": "%"}
    heart["text"] = div(("FEVG", "38,5 %"))
    out.append(heart)
    allergy = new("AllergyIntolerance", 42)
    allergy["clinicalStatus"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]
    }
    allergy["verificationStatus"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "code": "confirmed",
            }
        ]
    }
    allergy["code"] = {
        "coding": [{"system": ATC, "code": "J01CA04", "display": "amoxicilline"}],
        "text": "Amoxicilline",
    }
    allergy["patient"] = ref(patient)
    allergy["reaction"] = [{"manifestation": [{"text": "Éruption cutanée généralisée (urticaire)"}]}]
    allergy["text"] = div(("Allergie", "Amoxicilline"), ("Réaction", "urticaire"))
    out.append(allergy)
    plan = new("CarePlan", 43)
    plan["status"] = "active"
    plan["intent"] = "plan"
    plan["category"] = [
        {
            "coding": [{"system": LOINC, "code": "18776-5", "display": "Plan of care note"}],
            "text": "Suites à donner",
        }
    ]
    plan["title"] = "Suites à donner après la sortie"
    plan["subject"] = ref(patient)
    plan["encounter"] = ref(encounter)
    plan["created"] = "2024-03-14"
    plan["author"] = ref(author_role)
    plan["activity"] = [
        {
            "id": f"activity-{i}",
            "detail": {
                "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/request-priority", "valueCode": prio}],
                "kind": "ServiceRequest",
                "code": {"text": what},
                "status": "not-started",
                "scheduledPeriod": {"start": start},
                "performer": [ref(who, name)],
                "description": what,
            },
        }
        for i, (what, start, who, name, prio) in enumerate(
            [
                ("Consultation de cardiologie", "2024-04-15", author_role, "Dr Étienne Moreau", "routine"),
                (
                    "Ionogramme sanguin et créatininémie à J7",
                    "2024-03-21",
                    gp_role,
                    "Dr Claire Garnier",
                    "urgent",
                ),
                ("Échocardiographie de contrôle à 3 mois", "2024-06-14", chu, chu["name"], "routine"),
                ("Réadaptation cardiaque", "2024-04-01", chu, chu["name"], "routine"),
            ]
        )
    ]
    plan["text"] = div(("Action", "Consultation de cardiologie"), ("Quand", "15/04/2024"))
    out.append(plan)
    raw = (
        "<ClinicalDocument xmlns='urn:hl7-org:v3'><title>Lettre de liaison de sortie</title>"
        + "<section><text>Patiente hospitalisée pour décompensation cardiaque gauche.</text></section>" * 600
    )
    raw_bytes = raw.encode("utf-8")[:45_000]
    document = new("DocumentReference", 44)
    document["masterIdentifier"] = {"system": "urn:oid:1.2.250.1.213.1.1.9", "value": "LDL-2024-0031337"}
    document["status"] = "current"
    document["docStatus"] = "final"
    document["type"] = {
        "coding": [{"system": LOINC, "code": "34133-9", "display": "Summary of episode note"}],
        "text": "Lettre de liaison à la sortie",
    }
    document["subject"] = ref(patient)
    document["date"] = "2024-03-14T16:30:00+01:00"
    document["author"] = [ref(author_role)]
    document["custodian"] = ref(chu)
    document["description"] = "Lettre de liaison de sortie — cardiologie"
    document["securityLabel"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}
    ]
    document["content"] = [
        {
            "attachment": {
                "contentType": "application/xml",
                "language": "fr",
                "data": base64.b64encode(raw_bytes).decode("ascii"),
                "title": "Lettre de liaison de sortie",
                "size": len(raw_bytes),
            }
        }
    ]
    document["context"] = {"encounter": [ref(encounter)]}
    document["text"] = div(("Document d'origine", "Lettre de liaison de sortie"), ("Version", "1"))
    out.append(document)
    summary = f'<div xmlns="{XHTML}"><h2>Lettre de liaison</h2><p>Sortie le 14/03/2024 — retour au domicile.</p></div>'
    message = new("Communication", 45)
    message["status"] = "completed"
    message["category"] = [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/communication-category",
                    "code": "notification",
                }
            ],
            "text": "Lettre de liaison de sortie",
        }
    ]
    message["subject"] = ref(patient)
    message["encounter"] = ref(encounter)
    message["about"] = [ref(changes), ref(plan), ref(document)]
    message["sent"] = "2024-03-14T16:30:00+01:00"
    message["recipient"] = [ref(gp_role, "Dr Claire Garnier")]
    message["sender"] = ref(author_role)
    message["payload"] = [
        {
            "id": "change-table",
            "contentAttachment": {
                "contentType": "application/xhtml+xml",
                "language": "fr",
                "title": "Modifications du traitement",
                "data": base64.b64encode(summary.encode()).decode("ascii"),
            },
        },
        {
            "id": "section-motif",
            "contentString": "Motif d'hospitalisation : dyspnée d'effort stade III NYHA, œdèmes.",
        },
        {
            "id": "section-synthese",
            "contentString": "Synthèse : décompensation cardiaque sur fibrillation atriale.",
        },
        {"id": "return-home", "contentString": "Sortie le 14/03/2024 — retour au domicile"},
        {"id": "contacts", "contentString": "Contact hospitalier : Dr Étienne Moreau — +33 4 72 11 12 13"},
        {"id": "list", "contentReference": ref(changes, changes["title"])},
        {"id": "careplan", "contentReference": ref(plan, plan["title"])},
        {"id": "original", "contentReference": ref(document, document["description"])},
    ]
    message["text"] = {"status": "generated", "div": summary}
    out.append(message)
    outcome = new("OperationOutcome", 46)
    outcome["issue"] = [
        {
            "severity": "warning",
            "code": "incomplete",
            "diagnostics": "posologie non structurée",
            "location": ["/x/y"],
        }
    ]
    outcome["text"] = div(("Avertissement", "posologie non structurée"))
    out.append(outcome)
    provenance = new("Provenance", 47)
    provenance["target"] = [{"reference": urn(r["id"])} for r in out]
    provenance["recorded"] = RECORDED
    provenance["activity"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                "code": "DERIVE",
                "display": "derive",
            }
        ]
    }
    provenance["agent"] = [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "assembler",
                    }
                ]
            },
            "who": {"display": "discharge-gateway"},
        },
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "author",
                    }
                ]
            },
            "who": ref(author_role),
        },
    ]
    provenance["entity"] = [{"role": "source", "what": ref(document, "Lettre de liaison de sortie")}]
    provenance["text"] = div(("Traduit de", "Lettre de liaison de sortie (CDA R2)"))
    out.append(provenance)
    return out


def _timings_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn`` in ms over ``runs`` runs."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000, min(samples) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=300, help="timed runs of problems() (the models get runs/10)")
    args = parser.parse_args(argv)
    letter = build_letter()
    size = sum(len(orjson.dumps(r)) for r in letter)
    # Both must find the letter valid before the timings mean anything; this also compiles the
    # schemas (first use) outside the timings.
    for resource in letter:
        found, found_by_models = problems(resource), check_with_models(resource)
        if found or found_by_models:
            print(f"invalid {resource['resourceType']}: {found} / models: {found_by_models}", file=sys.stderr)
            return 1
    kinds: dict[str, int] = {}
    for resource in letter:
        kinds[resource["resourceType"]] = kinds.get(resource["resourceType"], 0) + 1

    def run_problems() -> None:
        for resource in letter:
            problems(resource)

    def run_problems_fhir_json() -> None:
        for resource in letter:
            problems(resource, fhir_json=True)

    def run_models() -> None:
        for resource in letter:
            check_with_models(resource)

    fast, fast_min = _timings_ms(run_problems, args.runs)
    strict, strict_min = _timings_ms(run_problems_fhir_json, args.runs)
    models, models_min = _timings_ms(run_models, max(args.runs // 10, 20))
    print(f"letter: {len(letter)} resources, {size / 1024:.1f} KiB of JSON")
    print("        " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    print(f"problems()                median {fast:7.3f} ms   (min {fast_min:.3f})")
    print(f"problems(fhir_json=True)  median {strict:7.3f} ms   (min {strict_min:.3f})")
    print(f"check_with_models()       median {models:7.3f} ms   (min {models_min:.3f})")
    print(f"ratio models / problems   {models / fast:7.1f}x      (required: at least 6x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
