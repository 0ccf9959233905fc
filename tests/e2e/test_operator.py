"""Operator commands run for real (``gateway.cli.main``) against SQLite and PostgreSQL: signing keys
(generate, rotate, show, verifying across a rotation), directory import (Bundle and CSV), consents
import (Bundle and NDJSON) — validated first, all or nothing, idempotent, audited."""

from __future__ import annotations

import copy
import csv
import io
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from joserfc.jwk import ECKey
from sqlalchemy import func, select, text

from gateway import seal
from gateway.auditlog import AuditLog, audit_table
from gateway.cli import main
from gateway.keys import load_public_keys
from gateway.operate import operator
from gateway.policy import policy_from
from gateway.store import ResourceStore, directory_from_store, make_engine
from tests.conftest import FIXTURES, mappings

DISPATCH = FIXTURES / "dispatch"
S6_AT = "2026-11-05T11:30:00+01:00"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(url: str) -> tuple[int, int]:
    """(resource versions, audit records) in the database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT count(*) FROM resource_version")).scalar()
            records = conn.execute(select(func.count()).select_from(audit_table)).scalar()
        return int(versions or 0), int(records or 0)
    finally:
        engine.dispose()


def audit_events(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        return AuditLog(engine).events()
    finally:
        engine.dispose()


# -- keys ------------------------------------------------------------------------------------------------
def test_keys_generate_writes_a_0600_key_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keydir = tmp_path / "keys"
    code, out, _err = run(capsys, "keys", "generate", "--out", str(keydir))
    assert code == 0
    private, public = keydir / "signing-key.jwk", keydir / "signing-key.pub.jwk"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    pub = orjson.loads(public.read_bytes())
    assert "d" not in pub and "d" in orjson.loads(private.read_bytes())
    kid = ECKey.import_key(pub).thumbprint()  # RFC 7638
    assert pub["kid"] == kid and f"new signing key {kid}" in out and str(private) in out
    assert [k.kid for k in load_public_keys((keydir / "keys.jwks").read_bytes())] == [kid]

    before = private.read_bytes()
    code, out, err = run(capsys, "keys", "generate", "--out", str(keydir))
    assert code == 2 and "a signing key exists" in err and out == ""
    assert private.read_bytes() == before

    code, out, err = run(capsys, "keys", "generate", "--out", str(keydir), "--force")
    assert code == 0
    archived = keydir / "archive" / f"{kid}.jwk"
    assert archived.read_bytes() == before and stat.S_IMODE(archived.stat().st_mode) == 0o600
    assert f"archived in {archived}" in err
    new_kid = orjson.loads(private.read_bytes())["kid"]
    assert new_kid != kid
    assert [k.kid for k in load_public_keys((keydir / "keys.jwks").read_bytes())] == [new_kid]


def test_a_rotation_keeps_old_checkpoints_and_messages_verifiable(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keydir = tmp_path / "keys"
    assert run(capsys, "keys", "generate", "--out", str(keydir))[0] == 0
    monkeypatch.setenv("GATEWAY_SIGNING_KEY_FILE", str(keydir / "signing-key.jwk"))
    old = seal.load_key((keydir / "signing-key.jwk").read_bytes())
    message = seal.sign({"resourceType": "Bundle", "type": "message"}, seal.Signer(old), "2026-11-23T10:00:00Z")

    assert run(capsys, "consents", "import", str(DISPATCH / "consents-s1.json"), "--db", database_url)[0] == 0
    code, out, _ = run(capsys, "audit", "checkpoint", "--url", database_url)
    assert code == 0 and out.startswith("checkpoint at seq 2:")

    code, out, _ = run(capsys, "keys", "rotate", "--dir", str(keydir))
    assert code == 0
    archived = keydir / "archive" / f"{old.kid}.jwk"
    assert stat.S_IMODE(archived.stat().st_mode) == 0o600 and f"moved to {archived}" in out
    new = seal.load_key((keydir / "signing-key.jwk").read_bytes())
    assert new.kid != old.kid
    assert run(capsys, "consents", "import", str(DISPATCH / "consents-s5.json"), "--db", database_url)[0] == 0
    code, out, _ = run(capsys, "audit", "checkpoint", "--url", database_url)
    assert code == 0 and out.startswith("checkpoint at seq 5:")

    keyring = str(keydir / "keys.jwks")
    code, out, _ = run(capsys, "audit", "verify", "--url", database_url, "--trust", keyring)
    assert code == 0, out
    assert "2 checkpoint(s); latest at seq 5" in out and f"by key {new.kid}" in out and "chain intact" in out
    code, out, _ = run(capsys, "audit", "verify", "--url", database_url, "--trust", str(keydir / "signing-key.pub.jwk"))
    assert code == 1
    assert (
        "CHAIN BROKEN at record 2: forged-checkpoint: checkpoint at seq 2: not signed by a trusted gateway key" in out
    )

    # a receiver given the keyring still accepts a message signed before the rotation
    assert seal.verify(message, load_public_keys((keydir / "keys.jwks").read_bytes())) == old.kid
    with pytest.raises(seal.SealError):
        seal.verify(message, load_public_keys((keydir / "signing-key.pub.jwk").read_bytes()))

    code, out, _ = run(capsys, "keys", "show", "--dir", str(keydir))
    assert code == 0
    assert f"current  {new.kid}" in out and f"trusts   {old.kid}  (private key archived)" in out


def test_keys_show_flags_a_private_key_readable_by_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "generate", "--out", str(tmp_path))[0] == 0
    (tmp_path / "signing-key.jwk").chmod(0o644)
    code, _out, err = run(capsys, "keys", "show", "--dir", str(tmp_path))
    assert code == 2 and "readable by others than its owner" in err


def test_rotate_without_a_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "keys", "rotate", "--dir", str(tmp_path))
    assert code == 2 and "run `gateway keys generate` first" in err
    assert list(tmp_path.iterdir()) == []


def test_trust_files_keep_the_kid_the_gateway_signs_with() -> None:
    """A PEM key signs with its thumbprint as kid (as the receiver computes it); a JWK's own kid is kept."""
    key = seal.generate_key()
    bundle = {"resourceType": "Bundle", "type": "message"}
    from_pem = seal.sign(bundle, seal.Signer(seal.load_key(key.as_pem(private=True))), "2026-11-23T10:00:00Z")
    assert seal.verify(from_pem, load_public_keys(key.as_pem(private=False))) == key.thumbprint()
    named = {**key.as_dict(private=True), "kid": "gateway-2025"}
    signed = seal.sign(bundle, seal.Signer(seal.load_key(orjson.dumps(named))), "2026-11-23T10:00:00Z")
    trusted = load_public_keys(orjson.dumps(named))
    assert seal.verify(signed, trusted) == "gateway-2025"
    assert not trusted[0].is_private, "a trust anchor never keeps the secret half"


# -- directory -------------------------------------------------------------------------------------------
def test_directory_bundle_import_is_audited_and_a_reimport_changes_nothing(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(DISPATCH / "directory.json")
    code, out, err = run(capsys, "directory", "import", directory, "--db", database_url)
    assert code == 0, err
    assert "  Endpoint          created   21  updated    0  unchanged    0  refused    0" in out
    assert "  PractitionerRole  created   15  updated    0  unchanged    0  refused    0" in out
    assert "  total             created   64  updated    0  unchanged    0  refused    0" in out
    assert "64 resource version(s) written in one transaction, each audited (audit records 1..64)" in out
    assert rows(database_url) == (64, 64)
    events = audit_events(database_url)
    assert {e["subtype"][0]["code"] for e in events} == {"create"}
    entries = orjson.loads((DISPATCH / "directory.json").read_bytes())["entry"]
    assert sorted(e["entity"][0]["what"]["reference"] for e in events) == sorted(
        f"{e['resource']['resourceType']}/{e['resource']['id']}/_history/1" for e in entries
    )
    assert {e["agent"][0]["who"]["display"] for e in events} == {operator()}
    assert {e["outcome"] for e in events} == {"0"}

    code, out, _ = run(capsys, "directory", "import", directory, "--db", database_url)
    assert code == 0
    assert "  total             created    0  updated    0  unchanged   64  refused    0" in out
    assert "nothing to write: all 64 already stored as given" in out
    assert rows(database_url) == (64, 64)


def test_a_changed_entry_is_one_new_version(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "directory", "import", str(DISPATCH / "directory.json"), "--db", database_url)[0] == 0
    bundle = orjson.loads((DISPATCH / "directory.json").read_bytes())
    org = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "saad-tilleuls")
    org["name"] = "SAAD Les Tilleuls (Paris 13)"
    bundle["type"] = "transaction"
    for entry in bundle["entry"]:
        res = entry["resource"]
        entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
    edited = tmp_path / "directory-edited.json"
    edited.write_bytes(orjson.dumps(bundle))
    code, out, _ = run(capsys, "directory", "import", str(edited), "--db", database_url)
    assert code == 0
    assert "  Organization      created    0  updated    1  unchanged   13  refused    0" in out
    assert rows(database_url) == (65, 65)
    last = audit_events(database_url)[-1]
    assert last["subtype"][0]["code"] == "update"
    assert last["entity"][0]["what"]["reference"] == "Organization/saad-tilleuls/_history/2"
    store = ResourceStore(database_url)
    try:
        assert store.read("Organization", "saad-tilleuls")["name"] == "SAAD Les Tilleuls (Paris 13)"  # type: ignore[index]
    finally:
        store.engine.dispose()


def _csv_of(bundle: dict[str, Any]) -> str:
    """The directory Bundle as the documented CSV (what an operator exports from a spreadsheet)."""
    columns = [
        "kind", "id", "active", "name", "family", "given", "prefix", "rpps", "finess", "type", "profession",
        "specialty", "practitioner", "organization", "endpoint", "address", "connection", "phone",
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()

    def tail(ref: dict[str, Any] | None) -> str:
        return str((ref or {}).get("reference", "")).rsplit("/", 1)[-1]

    def coded(concepts: list[dict[str, Any]] | None, default: str) -> str:
        if not concepts:
            return ""
        coding = concepts[0]["coding"][0]
        return coding["code"] if coding["system"] == default else f"{coding['system']}|{coding['code']}"

    for entry in bundle["entry"]:
        r = entry["resource"]
        row = {"kind": r["resourceType"], "id": r["id"], "active": "" if r.get("active", True) else "false"}
        ids = {i["system"]: i["value"] for i in r.get("identifier", [])}
        phone = next((t["value"] for t in r.get("telecom", []) if t["system"] == "phone"), "")
        if r["resourceType"] == "Organization":
            row |= {
                "name": r["name"],
                "finess": ids.get("https://finess.esante.gouv.fr", ""),
                "type": coded(r.get("type"), "https://mos.esante.gouv.fr/NOS/TRE_R66-CategorieEtablissement/FHIR/TRE-R66-CategorieEtablissement"),
                "endpoint": tail((r.get("endpoint") or [None])[0]),
                "phone": phone,
            }  # fmt: skip
        elif r["resourceType"] == "Practitioner":
            name = r["name"][0]
            row |= {
                "family": name["family"],
                "given": " ".join(name.get("given", [])),
                "prefix": " ".join(name.get("prefix", [])),
                "rpps": ids.get("https://rpps.esante.gouv.fr", ""),
                "phone": phone,
            }
        elif r["resourceType"] == "PractitionerRole":
            row |= {
                "practitioner": tail(r.get("practitioner")),
                "organization": tail(r.get("organization")),
                "profession": coded(r.get("code"), "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"),
                "specialty": coded(r.get("specialty"), "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"),
                "endpoint": tail((r.get("endpoint") or [None])[0]),
            }  # fmt: skip
        else:
            row |= {
                "active": "" if r["status"] == "active" else "false",
                "name": r.get("name", ""),
                "organization": tail(r.get("managingOrganization")),
                "address": r["address"],
                "connection": r["connectionType"]["code"],
            }
        writer.writerow(row)
    return buffer.getvalue()


def _recipients(url: str) -> list[tuple[Any, ...]]:
    store = ResourceStore(url)
    try:
        directory = directory_from_store(store, policy_from(mappings()))
        return sorted(
            (r.id, r.kind, r.display, r.endpoint.address if r.endpoint else None, r.endpoint and r.endpoint.connection,
             sorted(r.identifiers))
            for r in directory.recipients
        )  # fmt: skip
    finally:
        store.engine.dispose()


def test_a_csv_directory_routes_the_s6_letter_as_the_bundle_does(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = orjson.loads((DISPATCH / "directory.json").read_bytes())
    table = tmp_path / "directory.csv"
    table.write_text(_csv_of(bundle), encoding="utf-8")
    code, out, err = run(capsys, "directory", "import", str(table), "--db", database_url)
    assert code == 0, err
    assert f"directory import of {table} (csv): 64 entries" in out
    assert "  total             created   64  updated    0  unchanged    0  refused    0" in out
    from_bundle = f"sqlite:///{tmp_path / 'bundle.db'}"
    assert run(capsys, "directory", "import", str(DISPATCH / "directory.json"), "--db", from_bundle)[0] == 0
    assert _recipients(database_url) == _recipients(from_bundle)
    assert len(_recipients(database_url)) == 22

    # the letter itself: the stored directory and consents decide as the files do
    assert run(capsys, "consents", "import", str(DISPATCH / "consents-s6.json"), "--db", database_url)[0] == 0
    letter = str(DISPATCH / "ldl-ses-s6-objection.xml")
    from_files = run(
        capsys, "dispatch", letter, "--directory", str(DISPATCH / "directory.json"),
        "--consents", str(DISPATCH / "consents-s6.json"), "--out", str(tmp_path / "a"), "--at", S6_AT,
    )  # fmt: skip
    from_store = run(
        capsys, "dispatch", letter, "--directory", "-", "--store", database_url, "--out", str(tmp_path / "b"),
        "--at", S6_AT,
    )  # fmt: skip
    assert from_files[0] == from_store[0] == 0
    decisions = [line for line in from_files[2].splitlines() if not line.startswith("dispatched")]
    assert decisions == [line for line in from_store[2].splitlines() if not line.startswith("dispatched")]
    assert "PractitionerRole-gp-perrin: sent" in from_store[2]
    assert "Organization-saad-tilleuls: NOTHING SENT" in from_store[2]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["PractitionerRole-gp-perrin.json", "audit.json"]

    code, out, _ = run(capsys, "directory", "import", str(table), "--db", database_url)
    assert code == 0 and "unchanged   64" in out and rows(database_url)[0] == 64 + 2


def test_one_bad_row_refuses_the_whole_import(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "directory.csv"
    table.write_text(
        "kind;id;name;family;given;rpps;profession;practitioner;organization;endpoint;address\n"
        "Organization;cab-a;Cabinet A;;;;;;;ep-a;\n"
        "Endpoint;ep-a;;;;;;;cab-a;;https://cab-a.example/fhir\n"
        "Practitioner;dr-b;;BERNARD;Anne;123;;;;;\n"
        "PractitionerRole;gp-b;;;;;10;dr-b;cab-a;ep-a;\n"
        "PractitionerRole;gp-c;;;;;10;dr-nobody;cab-a;ep-a;\n"
        "Endpoint;ep-ftp;;;;;;;;;ftp://files.example/\n",
        encoding="utf-8",
    )
    code, out, err = run(capsys, "directory", "import", str(table), "--db", database_url)
    assert code == 2
    assert f"refused: {table}:4: Practitioner/dr-b: rpps '123' is not an 11-digit RPPS number" in err
    assert f"refused: {table}:6: PractitionerRole/gp-c: practitioner 'Practitioner/dr-nobody' is neither" in err
    assert f"refused: {table}:7: Endpoint/ep-ftp: address 'ftp://files.example/'" in err
    assert "NOTHING WRITTEN: 3 entries refused" in out
    assert "  Practitioner      created    0  updated    0  unchanged    0  refused    1" in out
    assert rows(database_url) == (0, 0)

    # a Bundle whose one entry is not valid FHIR R4: nothing of it is written either
    bundle = orjson.loads((DISPATCH / "directory.json").read_bytes())
    broken = copy.deepcopy(bundle)
    broken["entry"][40]["resource"]["active"] = "yes"
    path = tmp_path / "broken.json"
    path.write_bytes(orjson.dumps(broken))
    code, out, err = run(capsys, "directory", "import", str(path), "--db", database_url)
    what = broken["entry"][40]["resource"]
    assert code == 2
    assert f"refused: {path} entry 41: {what['resourceType']}/{what['id']}: not a valid FHIR R4" in err
    assert "NOTHING WRITTEN: 1 entry refused" in out and rows(database_url) == (0, 0)

    code, out, _ = run(
        capsys, "directory", "import", str(DISPATCH / "directory.json"), "--db", database_url, "--dry-run"
    )
    assert code == 0 and "dry run: nothing written; 64 resource version(s) would be written" in out
    assert rows(database_url) == (0, 0)


def test_a_csv_with_an_unknown_column_is_refused_as_a_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "d.csv"
    table.write_text("kind,id,colour\nOrganization,x,blue\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    code, _out, err = run(capsys, "directory", "import", str(table), "--db", url)
    assert code == 2 and f"refused: {table}:1: unknown column(s) 'colour'" in err


# -- consents --------------------------------------------------------------------------------------------
def test_consents_import_is_audited_verifiable_and_idempotent(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "consents", "import", str(DISPATCH / "consents-s2.json"), "--db", database_url)
    assert code == 0, err
    assert "  Consent        created    3  updated    1  unchanged    0  refused    0" in out
    assert "  RelatedPerson  created    1  updated    0  unchanged    0  refused    0" in out
    assert rows(database_url) == (5, 5)
    refs = [(e["subtype"][0]["code"], e["entity"][0]["what"]["reference"]) for e in audit_events(database_url)]
    assert ("create", "Consent/s2-refus-2018/_history/1") in refs
    assert ("update", "Consent/s2-refus-2018/_history/2") in refs
    assert len(refs) == 5
    code, out, _ = run(capsys, "audit", "verify", "--url", database_url)
    assert code == 0 and "5 records checked" in out and "chain intact" in out

    store = ResourceStore(database_url)
    try:  # the versions keep the time the file gives them: past decisions stay explainable
        versions = store.history("Consent", "s2-refus-2018")
        source = [
            e["resource"] for e in orjson.loads((DISPATCH / "consents-s2.json").read_bytes())["entry"]
            if e["resource"]["id"] == "s2-refus-2018"
        ]  # fmt: skip
        assert [v[3]["meta"]["lastUpdated"][:10] for v in versions] == [s["meta"]["lastUpdated"][:10] for s in source]
    finally:
        store.engine.dispose()

    code, out, _ = run(capsys, "consents", "import", str(DISPATCH / "consents-s2.json"), "--db", database_url)
    assert code == 0 and "nothing to write: all 5 already stored as given" in out
    assert rows(database_url) == (5, 5)

    # NDJSON, one resource per line: a consent without the patient's identifier is refused by line
    s7 = [e["resource"] for e in orjson.loads((DISPATCH / "consents-s7.json").read_bytes())["entry"]]
    bad = copy.deepcopy(s7[1])
    bad["patient"] = {"display": "Mme X"}
    ndjson = tmp_path / "consents.ndjson"
    ndjson.write_bytes(b"\n".join(orjson.dumps(r) for r in [s7[0], bad, *s7[2:]]) + b"\n")
    code, out, err = run(capsys, "consents", "import", str(ndjson), "--db", database_url)
    assert code == 2
    assert f"refused: {ndjson}:2: Consent/{bad['id']}: Consent.patient must carry the patient's identifier" in err
    assert rows(database_url) == (5, 5)
    ndjson.write_bytes(b"\n".join(orjson.dumps(r) for r in s7) + b"\n")
    code, out, _ = run(capsys, "consents", "import", str(ndjson), "--db", database_url)
    assert code == 0 and f"  Consent  created    {len(s7)}" in out
    assert rows(database_url) == (5 + len(s7), 5 + len(s7))
    assert run(capsys, "audit", "verify", "--url", database_url)[0] == 0

    # history is append-only: a version dated before the stored one is refused
    older = copy.deepcopy(s7[0])
    older["status"] = "inactive"
    older["meta"] = {"lastUpdated": "2001-01-01T00:00:00+01:00"}
    late = tmp_path / "late.ndjson"
    late.write_bytes(orjson.dumps(older) + b"\n")
    code, _out, err = run(capsys, "consents", "import", str(late), "--db", database_url)
    assert code == 2 and "consent history is append-only" in err
    assert rows(database_url) == (5 + len(s7), 5 + len(s7))


def test_dead_letters_list_on_an_empty_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'gw.db'}")
    code, out, err = run(capsys, "dead-letters", "list")
    assert code == 0 and out == "" and "0 dead-lettered deliveries" in err
    code, _out, err = run(capsys, "dead-letters", "replay", "not-a-message")
    assert code == 1 and "not dead-lettered (or unknown): not-a-message" in err


def test_an_unreachable_database_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "directory", "import", str(DISPATCH / "directory.json"), "--db", "postgresql://nobody@127.0.0.1:1/x"
    )
    assert code == 3 and out == "" and err.startswith("configuration error: database:")
