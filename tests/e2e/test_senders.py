"""A hospital system speaks only for its own establishments (``GATEWAY_SENDER_ORGANIZATIONS``).

An API key or a client certificate proves *who* is calling, not which establishment a letter comes from:
without a binding, a HIS of one hospital (compromised, or misconfigured by its interface engine) could push
letters in another hospital's name, and a GP would act on medication changes nobody there wrote.  Once the
setting is made, a letter is accepted only when its custodian (CDA's mandatory
``custodian/assignedCustodian/representedCustodianOrganization``; FHIR ``Composition.custodian``, else the
author's organisation) is one of its sender's, and every refusal is a 403 OperationOutcome (an MLLP AR)
with nothing stored and the refusal audited.  Unset, nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from gateway.api.app import create_app
from gateway.api.auth import certificate_name, key_name
from gateway.auditlog import AuditLog, Filters
from gateway.cli import _check_senders
from gateway.demo import seed_store
from gateway.intake import Intake
from gateway.mllp import MllpListener, Peer
from gateway.outbox import Outbox
from gateway.settings import ANY_ORGANIZATION, Settings, SettingsError, parse_sender_organizations
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_mllp import parse_ack
from tests.hl7v2_messages import CDA_S1, mdm, send_all

S6 = (FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml").read_bytes()
DOCUMENT = json.loads((FIXTURES / "fhir" / "document-s1.json").read_text(encoding="utf-8"))
GLACIERE = "1.2.250.1.71.4.2.2|1750999013"  # the fixtures' custodian, as CDA writes it (root|extension)
GLACIERE_FINESS = "https://finess.esante.gouv.fr|750999013"  # the same establishment's bare FINESS
OTHER = "1.2.250.1.71.4.2.2|1330781196"  # another hospital

KEYS = {
    "glaciere": "his-glaciere-0123456789abcdef",
    "finess": "his-finess-0123456789abcdef0",
    "other": "his-other-0123456789abcdef00",
    "engine": "his-engine-0123456789abcdef0",  # a regional interface engine: every establishment
    "unbound": "his-unbound-0123456789abcdef",
}
BINDING = ", ".join(
    [
        f"{key_name(KEYS['glaciere'])} = {GLACIERE}",
        f"{key_name(KEYS['finess'])} = {GLACIERE_FINESS}",
        f"# a comment\n{key_name(KEYS['other'])} = {OTHER} + 2.16.840.1.113883.19.5",
        f"{key_name(KEYS['engine'])} = *",
        "mllp:CHU-PARIS = urn:oid:1.2.250.1.71.4.2.2|1750999013",
        "mllp:CHU-LYON = " + OTHER,
    ]
)


def _letter(tag: str, body: bytes = S6) -> bytes:
    """The letter with a fresh document id (each push is a new letter)."""
    start = body.index(b"<id ", body.index(b"<ClinicalDocument"))
    end = body.index(b"/>", start) + 2
    return body[:start] + f'<id root="1.2.250.1.213.1.1.9.1.3" extension="SENDER-{tag}"/>'.encode() + body[end:]


def _without_organisation_ids(body: bytes) -> bytes:
    """The letter with no identifier on its custodian nor on its author's organisation (names kept)."""
    return body.replace(b'<id root="1.2.250.1.71.4.2.2" extension="1750999013"/>', b"")


@pytest.fixture
def gateway(database_url: str) -> Iterator[dict[str, Any]]:
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")
    settings = Settings(
        api_keys={key: frozenset({"his"}) for key in KEYS.values()},
        sender_organizations=parse_sender_organizations(BINDING),
    )
    app = create_app(settings, store, outbox, mappings())
    with TestClient(app) as client:
        yield {"client": client, "engine": engine, "outbox": outbox, "store": store, "settings": settings}
    engine.dispose()


def _push(gateway: dict[str, Any], key: str, body: bytes) -> Any:
    return gateway["client"].post(
        "/letters", content=body, headers={"Content-Type": "application/hl7-cda+xml", "X-API-Key": KEYS[key]}
    )


def _stored(gateway: dict[str, Any]) -> int:
    with gateway["engine"].connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM letter")).scalar_one())


def _refusals(gateway: dict[str, Any]) -> list[dict[str, Any]]:
    _, records = AuditLog(gateway["engine"]).search(Filters(kind="receive"), offset=0, count=100)
    return [r.event for r in records if r.event.get("outcome") == "4"]


def _forbidden(answer: Any, *words: str) -> str:
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    issue = answer.json()["issue"][0]
    assert (answer.json()["resourceType"], issue["code"]) == ("OperationOutcome", "forbidden")
    for word in words:
        assert word in issue["diagnostics"], issue["diagnostics"]
    return str(issue["diagnostics"])


def test_a_sender_bound_to_the_letter_s_establishment_is_accepted(gateway: dict[str, Any]) -> None:
    assert _push(gateway, "glaciere", _letter("a")).status_code == 202
    # the same establishment named by its bare FINESS (what CI-SIS's "1"+FINESS also means)
    assert _push(gateway, "finess", _letter("b")).status_code == 202
    assert _push(gateway, "engine", _letter("c")).status_code == 202
    assert _stored(gateway) == 3 and _refusals(gateway) == []


def test_a_letter_in_another_establishment_s_name_is_refused_stored_nowhere_and_audited(
    gateway: dict[str, Any],
) -> None:
    text = _forbidden(_push(gateway, "other", _letter("x")), key_name(KEYS["other"]), "1750999013", "Glacière")
    assert OTHER in text  # what the sender may send for, so an operator sees the mismatch at once
    assert _stored(gateway) == 0
    (refusal,) = _refusals(gateway)
    assert refusal["outcomeDesc"].startswith("refused (forbidden): sender ")
    assert refusal["agent"][0]["who"]["display"] == key_name(KEYS["other"])
    registry = gateway["outbox"].metrics.registry
    assert registry.get_sample_value("gateway_letters_refused_total", {"reason": "forbidden"}) == 1
    # the same letter from its own hospital's system goes through...
    assert _push(gateway, "glaciere", _letter("x")).status_code == 202
    # ...and, once stored, the foreign sender resending it is refused, not told its id ("already stored")
    again = _push(gateway, "other", _letter("x"))
    assert again.status_code == 403 and "letterId" not in again.text
    assert _stored(gateway) == 1


def test_a_sender_bound_to_nothing_is_refused_once_the_binding_is_set(gateway: dict[str, Any]) -> None:
    _forbidden(_push(gateway, "unbound", _letter("u")), "bound to no establishment")
    assert _stored(gateway) == 0 and len(_refusals(gateway)) == 1


def test_a_letter_naming_no_establishment_is_refused_not_guessed(gateway: dict[str, Any]) -> None:
    body = _without_organisation_ids(_letter("n"))
    assert b"1750999013" not in body
    _forbidden(_push(gateway, "glaciere", body), "names no custodian organisation identifier")
    # a sender bound to every establishment does not need to know which one
    assert _push(gateway, "engine", body).status_code == 202


def test_a_fhir_document_is_checked_on_its_custodian(gateway: dict[str, Any]) -> None:
    def message(key: str, tag: str) -> Any:
        document = {**DOCUMENT, "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{tag}"}}
        header = {"resourceType": "MessageHeader", "id": "h", "focus": [{"reference": f"Bundle/{document['id']}"}]}
        bundle = {"resourceType": "Bundle", "type": "message", "entry": [{"resource": header}, {"resource": document}]}
        return gateway["client"].post(
            "/$process-message", json=bundle, headers={"Content-Type": "application/fhir+json", "X-API-Key": KEYS[key]}
        )

    _forbidden(message("other", "7f0c2a4e-0000-4000-8000-000000000001"), "1750999013")
    assert message("finess", "7f0c2a4e-0000-4000-8000-000000000002").status_code == 202
    assert _stored(gateway) == 1


def test_unset_every_authenticated_sender_sends_for_any_establishment(database_url: str) -> None:
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    intake = Intake(Settings(), store, outbox, mappings())
    try:
        assert intake.accept(
            _letter("free"), "application/hl7-cda+xml", "client-000000000000", datetime.now(UTC)
        ).created
    finally:
        engine.dispose()


# -- MLLP ---------------------------------------------------------------------------------------------
def test_mllp_senders_are_bound_by_certificate_or_else_by_their_facility(database_url: str) -> None:
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")
    certificate = certificate_name("ab" * 32)
    binding = parse_sender_organizations(f"{BINDING}, {certificate} = {OTHER}")
    intake = Intake(Settings(sender_organizations=binding), store, outbox, mappings(), source="mllp")
    listener = MllpListener(intake, port=0)
    port = listener.start_in_thread()
    try:
        # plain MLLP: the facility MSH-4 claims is the only name the sender has
        assert parse_ack(send_all(port, [mdm(CDA_S1, control="OK00001")])[0]).code == "AA"
        ack = parse_ack(send_all(port, [mdm(CDA_S1, control="NO00001", facility="CHU-LYON")])[0])
        assert (ack.code, ack.condition) == ("AR", "103") and "mllp:CHU-LYON" in ack.user_message
        ack = parse_ack(send_all(port, [mdm(CDA_S1, control="NO00002", facility="CHU-NANTES")])[0])
        assert ack.code == "AR" and "bound to no establishment" in ack.user_message
        # over TLS the certificate decides, whatever MSH-4 says
        answer = listener.handle(mdm(CDA_S1, control="TLS0001"), peer=Peer("127.0.0.1", certificate))
        assert (parse_ack(answer).code, parse_ack(answer).condition) == ("AR", "103")
        assert _stored({"engine": engine}) == 1
    finally:
        listener.close()
        engine.dispose()


# -- the setting ---------------------------------------------------------------------------------------
def test_the_binding_reads_every_way_an_operator_writes_an_establishment() -> None:
    fingerprint = ":".join(["AB"] * 32)
    parsed = parse_sender_organizations(
        f"client-0123456789AB = {GLACIERE} + {GLACIERE_FINESS}\n"
        f"cert-{fingerprint} = urn:oid:2.16.840.1.113883.19.5\n"
        f"{'cd' * 32} = *\n"
        "mllp:CHU-PARIS = http://example.org/hospitals|H1"
    )
    assert parsed == {
        "client-0123456789ab": frozenset(
            {("urn:oid:1.2.250.1.71.4.2.2", "1750999013"), ("https://finess.esante.gouv.fr", "750999013")}
        ),
        "cert-abababababababab": frozenset({("urn:ietf:rfc:3986", "urn:oid:2.16.840.1.113883.19.5")}),
        "cert-cdcdcdcdcdcdcdcd": frozenset({ANY_ORGANIZATION}),
        "mllp:CHU-PARIS": frozenset({("http://example.org/hospitals", "H1")}),
    }


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("client-0123456789ab", "sender = organisation"),
        ("client-0123456789ab =", "sender = organisation"),
        ("his-key-0123456789abcdef = *", "is not client-"),  # the API key itself: never written here
        ("client-0123 = *", "is not client-"),
        ("cert-abcd = *", "is not client-"),
        ("mllp: = *", "is not client-"),
        ("client-0123456789ab = 1750999013", "is not system|value"),
        ("client-0123456789ab = |1750999013", "is not system|value"),
        ("client-0123456789ab = *, client-0123456789AB = *", "listed twice"),
    ],
)
def test_a_malformed_binding_stops_the_start(text: str, why: str) -> None:
    with pytest.raises(SettingsError, match=why.replace("|", r"\|")):
        parse_sender_organizations(text)


def test_the_binding_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "senders").write_text(BINDING, encoding="utf-8")
    from_file = Settings.from_env({"GATEWAY_SENDER_ORGANIZATIONS_FILE": str(tmp_path / "senders")})
    assert from_file.sender_organizations == parse_sender_organizations(BINDING)
    with pytest.raises(SettingsError, match="GATEWAY_SENDER_ORGANIZATIONS"):
        Settings.from_env({"GATEWAY_SENDER_ORGANIZATIONS": "nobody = *"})


def test_serve_warns_about_senders_left_out_and_entries_nobody_answers_to(json_logs: Any) -> None:
    settings = Settings(
        api_keys={KEYS["glaciere"]: frozenset({"his"}), KEYS["unbound"]: frozenset({"his"})},
        client_certs={"ef" * 32: frozenset({"auditor"})},
        mllp_senders=frozenset({"CHU-PARIS"}),
        sender_organizations=parse_sender_organizations(
            f"{key_name(KEYS['glaciere'])} = *, client-0000000000ff = *, mllp:CHU-PARIS = *, mllp:CHU-LYON = *"
        ),
    )
    _check_senders(settings)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    typos = sorted(line["sender"] for line in lines if "no API key" in line["event"])
    left_out = sorted(line["sender"] for line in lines if "bound to no establishment" in line["event"])
    assert typos == ["client-0000000000ff", "mllp:CHU-LYON"]
    assert left_out == [key_name(KEYS["unbound"])]  # the auditor certificate pushes nothing: no warning
