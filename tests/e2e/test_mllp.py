"""HL7 v2 over MLLP end to end on loopback: a real listener, a real database, real MLLP clients.

The listener runs as ``gateway serve --mllp-port`` runs it (its own event loop in a thread) over the
S1 directory and consents; messages are sent with python-hl7's MLLP client or a plain socket, and
every ACK is read back with hl7apy (an independent HL7 parser).  What is stored is checked in the
database: an AA means the letter, its deliveries and its audit are there; a refusal stores nothing
but its audit record.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hl7.client
import orjson
import pytest
from fastapi.testclient import TestClient
from hl7apy.core import Message
from hl7apy.parser import parse_message
from sqlalchemy import text

from gateway.api.app import create_app
from gateway.deliver import Deliverer, RetryPolicy
from gateway.demo import seed_store
from gateway.intake import Intake
from gateway.mllp import MllpListener
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from tests.conftest import FIXTURES, mappings
from tests.fuzz.world import Recording
from tests.hl7v2_messages import CDA_S1, PDF, ed, frame, mdm, message, msh, pid, read_ack, send_all

HIS = "his-key-0123456789abcdef0000"
DISPATCH = FIXTURES / "dispatch"


@dataclass
class Ack:
    code: str
    control: str
    text: str
    kind: str
    condition: str
    location: str
    user_message: str


def parse_ack(raw: bytes) -> Ack:
    """The ACK as hl7apy reads it (not our own parser)."""
    assert raw, "no ACK: the listener closed the connection"
    msg = parse_message(raw.decode("utf-8"), find_groups=False)
    err = [s for s in msg.children if s.name == "ERR"]

    def value(field: Any) -> str:
        return str(field.to_er7()) if field is not None else ""

    return Ack(
        code=value(msg.msa.msa_1),
        control=value(msg.msa.msa_2),
        text=value(msg.msa.msa_3),
        kind=value(msg.msh.msh_9),
        condition=value(err[0].err_3.err_3_1) if err else "",
        location=value(err[0].err_2) if err else "",
        user_message=value(err[0].err_8) if err else "",
    )


@dataclass
class Gateway:
    port: int
    store: ResourceStore
    outbox: Outbox
    intake: Intake
    worker: Deliverer
    transport: Recording
    remembered: list[str]

    def rows(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("letter", "delivery", "audit_event")
            }


def _load_s1(store: ResourceStore) -> None:
    seed_store(store, lambda ep: f"https://{ep}.example.fr/fhir")


@pytest.fixture
def gateway(database_url: str, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    options: dict[str, Any] = getattr(request, "param", {})
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    _load_s1(store)
    settings = Settings(api_keys={HIS: frozenset({"his"})})
    transport = Recording()
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=Signer(generate_key()),
        transports={"https": transport},
        retry=RetryPolicy(max_attempts=2, initial=60.0),
    )
    remembered: list[str] = []

    def remember(letter_id: str, prepared: Any) -> None:  # as `gateway serve` wires it: worker.remember
        remembered.append(letter_id)
        worker.remember(letter_id, prepared)

    intake = Intake(settings, store, outbox, mappings(), on_accepted=remember, source="mllp")
    listener = MllpListener(intake, port=0, **options)
    port = listener.start_in_thread()
    try:
        yield Gateway(port, store, outbox, intake, worker, transport, remembered)
    finally:
        listener.close()
        worker.close()
        engine.dispose()


def _send(port: int, raw: bytes) -> Ack:
    """With python-hl7's MLLP client (a real sender's library)."""
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        answer = client.send_message(raw)
        while not answer.endswith(b"\x1c\r"):  # the client returns what one recv() gave
            more = client.socket.recv(65536)
            assert more, "connection closed mid-ACK"
            answer += more
    return parse_ack(answer[1:-2])


def _letter_id(ack: Ack) -> str:
    assert ack.code == "AA", ack
    return ack.text.split()[1]


# -- accepted -------------------------------------------------------------------------------------------
def test_mdm_t02_built_with_hl7apy_is_stored_with_deliveries_and_audit(gateway: Gateway) -> None:
    m = Message("MDM_T02", version="2.5")
    m.msh.msh_3, m.msh.msh_4, m.msh.msh_5, m.msh.msh_6 = "DPI", "CHU-PARIS", "GATEWAY", "GW"
    m.msh.msh_9, m.msh.msh_10, m.msh.msh_11 = "MDM^T02^MDM_T02", "HAPY0001", "P"
    m.evn.evn_2 = "20261105100000"
    m.pid.pid_3 = "~".join(
        (
            "IPP0004527891^^^CHU-PARIS&1.2.250.1.213.1.1.9.1.1&ISO^PI",
            "244037511305285^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS",
        )
    )
    m.pv1.pv1_2 = "I"
    m.txa.txa_1, m.txa.txa_2, m.txa.txa_3, m.txa.txa_17 = "1", "11490-0", "AP", "AU"
    obx = m.add_group("MDM_T02_OBSERVATION").obx
    obx.obx_1, obx.obx_2, obx.obx_3 = "1", "ED", "11490-0^Lettre de liaison^LN"
    obx.obx_5 = "^TEXT^XML^Base64^" + base64.b64encode(CDA_S1).decode()
    obx.obx_11 = "F"

    ack = _send(gateway.port, m.to_er7().encode())

    assert ack.code == "AA" and ack.control == "HAPY0001" and ack.kind == "ACK^T02^ACK"
    letter_id = _letter_id(ack)
    letter = gateway.outbox.letter(letter_id)
    assert letter is not None and letter["client"] == "mllp:DPI@CHU-PARIS"
    assert letter["deliveries"], "routed to the S1 care team"
    assert gateway.outbox.letter_body(letter_id) == (CDA_S1, "application/hl7-cda+xml")
    assert gateway.remembered == [letter_id], "the delivery worker is told at once"
    # the same pipeline from here on: the worker delivers, and every disclosure is audited with the letter
    assert gateway.worker.run_once(limit=50) == len(letter["deliveries"])
    assert len(gateway.transport.sent) == len(letter["deliveries"])
    events = gateway.outbox.audit_events(letter_id)
    assert len(events) >= len(letter["deliveries"])


def test_oru_r01_with_pdf_and_cda_takes_the_cda(gateway: Gateway) -> None:
    raw = message(
        msh("ORU^R01^ORU_R01", "ORU0001"),
        pid(),
        "OBR|1||DOC-0001|11490-0^Lettre de liaison^LN",
        ed(1, PDF, subtype="PDF", kind="Application", ident="PDF^Version imprimable^L"),
        ed(2, CDA_S1, subtype="x-hl7-cda-level-one", kind="multipart", ident="CDA^Lettre structuree^L"),
    )
    ack = _send(gateway.port, raw)
    assert ack.code == "AA" and ack.control == "ORU0001" and ack.kind == "ACK^R01^ACK"
    assert gateway.outbox.letter_body(_letter_id(ack)) == (CDA_S1, "application/hl7-cda+xml")


# -- refused ------------------------------------------------------------------------------------------
def _refused(gateway: Gateway, raw: bytes) -> Ack:
    before = gateway.rows()
    ack = _send(gateway.port, raw)
    after = gateway.rows()
    assert ack.code in ("AE", "AR"), ack
    assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"]), "nothing stored"
    assert after["audit_event"] == before["audit_event"] + 1, "the refusal is audited"
    refusal = gateway.outbox.audit_events()[-1]
    assert refusal["outcome"] == "4" and refusal["outcomeDesc"].startswith("refused")
    assert "DUPONT" not in orjson.dumps(refusal).decode(), "no patient data in the audit of a refusal"
    return ack


def test_pdf_alone_is_refused_not_guessed(gateway: Gateway) -> None:
    raw = message(msh("ORU^R01^ORU_R01", "ORU0002"), pid(), ed(1, PDF, subtype="PDF", kind="Application"))
    ack = _refused(gateway, raw)
    assert (ack.code, ack.control, ack.condition) == ("AE", "ORU0002", "101")
    assert "PDF" in ack.user_message and "CDA" in ack.user_message


def test_bad_base64_is_ae(gateway: Gateway) -> None:
    ack = _refused(gateway, message(msh(), pid(), ed(1, b"", text="PD94bWwg!!!not*base64")))
    assert (ack.code, ack.condition, ack.location) == ("AE", "102", "OBX^1^5^1^5")
    assert "base64" in ack.user_message


def test_xxe_inside_the_message_is_ae_and_nothing_is_stored(gateway: Gateway) -> None:
    xxe = (FIXTURES / "cda" / "bad" / "xxe-file.xml").read_bytes()
    ack = _refused(gateway, mdm(xxe, "XXE0001"))
    assert (ack.code, ack.condition) == ("AE", "102")
    assert "DOCTYPE" in ack.user_message or "ENTITY" in ack.user_message


def test_unsupported_message_type_is_ar(gateway: Gateway) -> None:
    ack = _refused(gateway, message(msh("ADT^A01^ADT_A01", "ADT0001"), "EVN|A01|20261105", pid()))
    assert (ack.code, ack.control, ack.condition, ack.kind) == ("AR", "ADT0001", "200", "ACK^A01^ACK")


def test_pid_that_contradicts_the_cda_is_ae(gateway: Gateway) -> None:
    other = "IPP0009999999^^^CHU-PARIS&1.2.250.1.213.1.1.9.1.1&ISO^PI"
    raw = message(msh(control="MIS0001"), "EVN|T02|20261105", pid(other), ed(1, CDA_S1))
    ack = _refused(gateway, raw)
    assert (ack.code, ack.condition, ack.location) == ("AE", "204", "PID^1^3")
    assert "IPP0009999999" not in ack.user_message and "IPP0004527891" not in ack.user_message


def test_unknown_sender_is_refused_when_senders_are_listed(database_url: str) -> None:
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    listener = MllpListener(Intake(Settings(), store, outbox, mappings()), port=0, senders=["CHU-LYON"])
    port = listener.start_in_thread()
    try:
        ack = parse_ack(send_all(port, [mdm(control="WHO0001")])[0])
    finally:
        listener.close()
        engine.dispose()
    assert (ack.code, ack.condition, ack.location) == ("AR", "103", "MSH^1^4")


# -- idempotency, connections, limits -----------------------------------------------------------------
def test_the_same_message_twice_is_one_letter(gateway: Gateway) -> None:
    first = _send(gateway.port, mdm(control="DUP0001"))
    again = _send(gateway.port, mdm(control="DUP0002"))
    assert _letter_id(first) == _letter_id(again)
    assert "already stored" in again.text
    assert gateway.rows()["letter"] == 1
    assert len(gateway.remembered) == 1


def test_http_and_mllp_share_one_path(gateway: Gateway) -> None:
    """The same letter pushed over HTTP first is the same letter over MLLP (one intake, one key)."""
    app = create_app(gateway.intake.settings, gateway.store, gateway.outbox, mappings())
    with TestClient(app) as client:
        pushed = client.post(
            "/letters",
            content=CDA_S1,
            headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
        )
    assert pushed.status_code == 202
    ack = _send(gateway.port, mdm(control="BOTH0001"))
    assert _letter_id(ack) == pushed.json()["letterId"]


def test_several_messages_on_one_connection_each_get_their_ack(gateway: Gateway) -> None:
    raws = [
        mdm(control="SEQ0001"),
        message(msh("ADT^A08^ADT_A01", "SEQ0002"), pid()),
        mdm(control="SEQ0003", charset=""),
        message(msh(control="SEQ0004"), pid(), ed(1, PDF, subtype="PDF")),
    ]
    acks = [parse_ack(a) for a in send_all(gateway.port, raws)]
    assert [(a.control, a.code) for a in acks] == [
        ("SEQ0001", "AA"),
        ("SEQ0002", "AR"),
        ("SEQ0003", "AA"),
        ("SEQ0004", "AE"),
    ]
    assert _letter_id(acks[0]) == _letter_id(acks[2])


@pytest.mark.parametrize("gateway", [{"max_frame_bytes": 20_000}], indirect=True)
def test_an_oversize_frame_is_refused_and_the_connection_closed(gateway: Gateway) -> None:
    before = gateway.rows()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(frame(mdm(control="BIG0001")))  # ~90 kB: over the 20 kB frame limit
        ack = parse_ack(read_ack(sock))
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    assert (ack.code, ack.control, ack.condition) == ("AE", "BIG0001", "104")
    assert closed, "the rest of an oversize frame is never read: the connection is closed"
    after = gateway.rows()
    assert (after["letter"], after["audit_event"]) == (before["letter"], before["audit_event"] + 1)


@pytest.mark.parametrize("gateway", [{"idle_timeout": 0.3}], indirect=True)
def test_an_idle_connection_is_closed(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""
    assert time.monotonic() - started < 5


def test_bytes_before_a_frame_and_a_hangup_mid_frame_store_nothing(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"\r\n" + frame(mdm(control="WS0001")))
        assert parse_ack(read_ack(sock)).code == "AA"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"\x0b" + mdm(control="HALF0001")[:500])
    time.sleep(0.2)
    assert gateway.rows()["letter"] == 1
