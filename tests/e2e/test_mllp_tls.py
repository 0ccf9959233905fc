"""HL7 v2 over MLLP over TLS (GATEWAY_MLLP_TLS=client-cert): a real listener, real TLS handshakes on loopback.

A sender gets in only with a client certificate that chains to the configured CA *and* is mapped to the
``his`` role; a genuine but unmapped certificate gets one AR and the connection closes, audited as a
refused authentication; without a certificate, with one from another CA or in clear, the handshake
fails and nothing is read.  What is stored is checked in the database each time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from gateway.api.auth import fingerprint
from gateway.api.logins import RefusedLogins
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.mllp import MllpListener, server_tls_context
from gateway.outbox import Outbox
from gateway.settings import Settings, SettingsError
from gateway.store import ResourceStore, make_engine
from tests import pki
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_mllp import _load_s1, parse_ack
from tests.e2e.test_serve_process import _free_port
from tests.hl7v2_messages import frame, mdm, read_ack

GATEWAY = str(Path(sys.executable).with_name("gateway"))


@dataclass(frozen=True)
class Certs:
    authority: pki.Issued
    ca: Path
    server: tuple[Path, Path]
    his: tuple[Path, Path]
    his_fp: str
    auditor: tuple[Path, Path]  # mapped, but not to his
    auditor_fp: str
    intruder: tuple[Path, Path]  # signed by the CA, mapped to nothing
    intruder_fp: str
    rogue: tuple[Path, Path]  # from another CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    where = tmp_path_factory.mktemp("mllp-pki")
    ca, rogue_ca = pki.ca("Hospital CA"), pki.ca("Rogue CA")
    (where / "ca.crt").write_bytes(ca.cert_pem)
    his = pki.issue(ca, "dpi-chu-glaciere", client=True)
    auditor = pki.issue(ca, "dim-auditor", client=True)
    intruder = pki.issue(ca, "intruder", client=True)
    return Certs(
        authority=ca,
        ca=where / "ca.crt",
        server=pki.issue(ca, "localhost", server=True).write(where, "server"),
        his=his.write(where, "his"),
        his_fp=fingerprint(his.der),
        auditor=auditor.write(where, "auditor"),
        auditor_fp=fingerprint(auditor.der),
        intruder=intruder.write(where, "intruder"),
        intruder_fp=fingerprint(intruder.der),
        rogue=pki.issue(rogue_ca, "dpi-chu-glaciere", client=True).write(where, "rogue"),
    )


@dataclass
class Listening:
    port: int
    store: ResourceStore
    outbox: Outbox
    metrics: Metrics

    def rows(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("letter", "delivery", "audit_event")
            }


@pytest.fixture
def listening(database_url: str, certs: Certs, request: pytest.FixtureRequest) -> Iterator[Listening]:
    options: dict[str, Any] = getattr(request, "param", {})
    engine = make_engine(database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    _load_s1(store)
    metrics = Metrics()
    listener = MllpListener(
        Intake(Settings(), store, outbox, mappings(), source="mllp"),
        port=0,
        tls=server_tls_context(*certs.server, certs.ca),
        certificates={certs.his_fp: frozenset({"his"}), certs.auditor_fp: frozenset({"auditor"})},
        logins=RefusedLogins(outbox.log, metrics),
        metrics=metrics,
        **options,
    )
    port = listener.start_in_thread()
    try:
        yield Listening(port, store, outbox, metrics)
    finally:
        listener.close()
        engine.dispose()


def _client(certs: Certs, identity: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if identity is not None:
        context.load_cert_chain(*map(str, identity))
    return context


def _exchange(port: int, context: ssl.SSLContext, messages: list[bytes]) -> list[bytes]:
    """Each message on one TLS connection, waiting for each ACK; b"" once the listener has hung up."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        acks = []
        for message in messages:
            try:
                sock.sendall(frame(message))
                acks.append(read_ack(sock))
            except (ssl.SSLError, ConnectionError):
                acks.append(b"")
        return acks


def test_a_his_certificate_sends_letters_and_its_fingerprint_names_the_sender(
    listening: Listening, certs: Certs
) -> None:
    first, second = _exchange(listening.port, _client(certs, certs.his), [mdm(control="TLS1"), mdm(control="TLS2")])
    first_ack, second_ack = parse_ack(first), parse_ack(second)
    assert first_ack.code == "AA" and second_ack.code == "AA"
    letter_id = first_ack.text.split()[1]
    assert second_ack.text.split()[1] == letter_id, "the same letter twice is one letter"
    letter = listening.outbox.letter(letter_id)
    assert letter is not None and letter["deliveries"]
    assert letter["client"] == f"mllp:DPI@CHU-PARIS (cert-{certs.his_fp[:16]})"
    assert listening.rows()["letter"] == 1


@pytest.mark.parametrize("who", ["intruder", "auditor"])
def test_a_genuine_certificate_not_mapped_to_his_gets_one_ar_and_is_audited(
    listening: Listening, certs: Certs, who: str
) -> None:
    identity, print_ = (certs.intruder, certs.intruder_fp) if who == "intruder" else (certs.auditor, certs.auditor_fp)
    before = listening.rows()
    acks = _exchange(listening.port, _client(certs, identity), [mdm(control="NOPE1"), mdm(control="NOPE2")])
    ack = parse_ack(acks[0])
    assert (ack.code, ack.condition) == ("AR", "103")
    assert print_[:16] in ack.text and "not authorised" in ack.text
    assert acks[1] == b"", "the connection must be closed after the refusal"
    after = listening.rows()
    assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"]) == (0, 0)
    refusals = [e for e in listening.outbox.audit_events() if e["type"]["code"] == "110114"]
    assert len(refusals) == 1, refusals
    [refusal] = refusals
    assert refusal["outcome"] == "4" and refusal["agent"][0]["who"]["display"] == f"cert-{print_[:16]}"
    assert refusal["agent"][0]["network"]["address"] == "127.0.0.1"
    assert refusal["entity"][0]["what"]["display"] == "MLLP MDM^T02"
    counted = listening.metrics.auth_refused.labels("unknown-certificate")._value.get()
    assert counted == 1


@pytest.mark.parametrize("listening", [{"max_frame_bytes": 20_000}], indirect=True)
def test_an_unmapped_certificate_sending_an_oversize_frame_is_refused_as_unauthorised(
    listening: Listening, certs: Certs
) -> None:
    [answer] = _exchange(listening.port, _client(certs, certs.intruder), [mdm(control="BIGNOPE")])  # ~90 kB
    ack = parse_ack(answer)
    assert (ack.code, ack.condition) == ("AR", "103") and "not authorised" in ack.text
    kinds = [e["type"]["code"] for e in listening.outbox.audit_events()]
    assert kinds == ["110114"], "a refused authentication, not a refused letter"


@pytest.mark.parametrize("who", ["none", "rogue"])
def test_without_a_certificate_of_the_hospital_ca_the_handshake_fails_and_nothing_is_read(
    listening: Listening, certs: Certs, who: str, caplog: pytest.LogCaptureFixture
) -> None:
    identity = None if who == "none" else certs.rogue
    with caplog.at_level(logging.WARNING, logger="gateway.mllp"):
        try:
            acks = _exchange(listening.port, _client(certs, identity), [mdm(control="ANON1")])
        except (ssl.SSLError, ConnectionError):
            acks = [b""]  # refused in the handshake (TLS 1.2), or at the first read (TLS 1.3)
        _logged(caplog, "TLS handshake with 127.0.0.1 failed")
    assert acks == [b""]
    assert listening.rows() == {"letter": 0, "delivery": 0, "audit_event": 0}
    assert _handshakes(listening) == {"refused": 1, "abandoned": 0}


def _handshakes(listening: Listening) -> dict[str, float]:
    counter = listening.metrics.mllp_handshakes
    return {kind: counter.labels(kind)._value.get() for kind in ("refused", "abandoned")}


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait for the listener's thread to log ``text`` (the client may see the refusal first)."""
    deadline = time.monotonic() + 10
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)


def test_plain_mllp_to_the_tls_port_is_not_read(listening: Listening, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="gateway.mllp"),
        socket.create_connection(("127.0.0.1", listening.port), timeout=10) as sock,
    ):
        sock.sendall(frame(mdm(control="CLEAR1")))
        try:
            answer = sock.recv(65536)
        except ConnectionError:
            answer = b""
        _logged(caplog, "TLS handshake with 127.0.0.1 failed")
    assert b"MSA" not in answer
    assert listening.rows() == {"letter": 0, "delivery": 0, "audit_event": 0}


def test_tls_without_any_his_certificate_or_with_missing_files_refuses_to_start(
    database_url: str, certs: Certs, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    try:
        intake = Intake(Settings(), ResourceStore(engine=engine), Outbox(engine), mappings())
        context = server_tls_context(*certs.server, certs.ca)
        with pytest.raises(SettingsError, match="his role"):
            MllpListener(intake, port=0, tls=context, certificates={certs.auditor_fp: frozenset({"auditor"})})
    finally:
        engine.dispose()
    with pytest.raises(SettingsError, match="no such file"):
        server_tls_context(tmp_path / "missing.crt", None, certs.ca)
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(SettingsError, match="cannot load"):
        server_tls_context(tmp_path / "junk.crt", None, certs.ca)


def _serve_env(tmp_path: Path, certs: Certs, mllp_port: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_MODE": "demo",
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
        "GATEWAY_API_KEYS": "his-key-0123456789abcdef:his",
        "GATEWAY_TLS_CERT_FILE": str(certs.server[0]),
        "GATEWAY_TLS_KEY_FILE": str(certs.server[1]),
        "GATEWAY_TLS_CA_FILE": str(certs.ca),
        "GATEWAY_CLIENT_CERTS": f"{certs.his_fp}:his",
        "GATEWAY_MLLP_PORT": str(mllp_port),
        "GATEWAY_MLLP_TLS": "client-cert",
        "GATEWAY_LOG_FORMAT": "json",
    }


def test_gateway_serve_takes_mllp_over_tls_from_its_environment(tmp_path: Path, certs: Certs) -> None:
    env = _serve_env(tmp_path, certs, mllp_port := _free_port())
    soon = pki.issue(certs.authority, "localhost", server=True, not_after=pki.NOW + timedelta(days=10))
    env["GATEWAY_TLS_CERT_FILE"], env["GATEWAY_TLS_KEY_FILE"] = map(str, soon.write(tmp_path, "server-soon"))
    env["GATEWAY_OUT_TLS_CERT_FILE"], env["GATEWAY_OUT_TLS_KEY_FILE"] = map(str, certs.his)
    env["GATEWAY_OUT_TLS_CA_FILE"] = str(certs.ca)
    api_port = _free_port()
    imported = subprocess.run(
        [GATEWAY, "directory", "import", str(FIXTURES / "dispatch" / "directory.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([GATEWAY, "serve", "--port", str(api_port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "over TLS, client certificates required" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        [ack] = _exchange(mllp_port, _client(certs, certs.his), [mdm(control="SERVE-TLS-1")])
        assert parse_ack(ack).code == "AA", ack
        [refused] = _exchange(mllp_port, _client(certs, certs.intruder), [mdm(control="SERVE-TLS-2")])
        assert parse_ack(refused).code == "AR"
        # the API's certificate (the same) expires in 10 days: said at start, and exported for alerting
        scraped = httpx.get(f"https://127.0.0.1:{api_port}/metrics", verify=_client(certs, None), timeout=10).text
        expiries = {
            s.labels["certificate"]: s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "gateway_certificate_expiry_timestamp_seconds"
        }
        assert expiries == {
            "server": soon.cert.not_valid_after_utc.timestamp(),
            "recipients-client": pki.NOW.timestamp() + 30 * 86400,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    engine = make_engine(env["GATEWAY_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            clients = conn.execute(text("SELECT client FROM letter")).scalars().all()
    finally:
        engine.dispose()
    assert clients == [f"mllp:DPI@CHU-PARIS (cert-{certs.his_fp[:16]})"]
    warned = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if "certificate" in line]
    assert [(w["event"], w["certificate"]) for w in warned if w.get("level") == "warning"] == [
        ("certificate expires soon", "recipients-client"),
        ("certificate expires soon", "server"),
    ]


def test_gateway_serve_refuses_mllp_tls_without_a_server_certificate(tmp_path: Path, certs: Certs) -> None:
    env = _serve_env(tmp_path, certs, _free_port())
    del env["GATEWAY_TLS_CERT_FILE"], env["GATEWAY_TLS_KEY_FILE"]
    done = subprocess.run(
        [GATEWAY, "serve", "--port", str(_free_port()), "--processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "GATEWAY_MLLP_TLS=client-cert" in done.stderr and "GATEWAY_TLS_CERT_FILE" in done.stderr


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True)])
def test_plain_mllp_beyond_loopback_is_warned_about(
    database_url: str, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    engine = make_engine(database_url)
    listener = MllpListener(
        Intake(Settings(), ResourceStore(engine=engine), Outbox(engine), mappings()), host=host, port=0
    )
    try:
        with caplog.at_level(logging.INFO, logger="gateway.mllp"):
            listener.start_in_thread()
    finally:
        listener.close()
        engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) is warned, warnings
    assert not warned or "WITHOUT TLS" in warnings[0]


def test_a_tcp_probe_that_says_nothing_is_only_noted(listening: Listening, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.mllp"):
        socket.create_connection(("127.0.0.1", listening.port), timeout=10).close()  # a load balancer's probe
        _logged(caplog, "TLS handshake with 127.0.0.1 failed")
    failed = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.INFO], [r.getMessage() for r in failed]
    assert _handshakes(listening) == {"refused": 0, "abandoned": 1}
