"""MSSanté receipts read from the application mailbox over IMAP (a real Dovecot on loopback).

An MSSanté operator does not relay mail to an application: the application reads its mailbox (IMAP
with STARTTLS or implicit TLS, a password or its IGC-Santé certificate).  Receipts (MDNs, bounces)
found there acknowledge or dead-letter deliveries exactly once, are removed only after their outcome
is committed, and mail that is not a usable receipt stays for a person to read.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine

from gateway.mdn import ImapSettings, MailboxError, MdnMailbox, imap_folder, mailbox_from_env
from gateway.outbox import Outbox
from gateway.settings import SettingsError
from gateway.transports.http import tls_context
from gateway.transports.mssante import SmtpSettings
from tests.contract.test_mssante import (
    GATEWAY,
    GP,
    _raw_mdn,
    _sent_s1,
    build_dsn,
    build_mdn,
    pki,
    serve,
    signer,
    world,
)
from tests.imap_server import DOVECOT, GATEWAY_PASSWORD, GATEWAY_USER, ImapServer, dovecot_for, write_pki

__all__ = ["pki", "serve", "signer", "world"]  # test_mssante's fixtures, used here by name

# skipped where Dovecot is not installed (apt-get install dovecot-imapd), never under CI: .ci/run installs it
pytestmark = pytest.mark.skipif(DOVECOT is None and not os.environ.get("CI"), reason="dovecot is not installed")

PHARMACIST = "julien.lemaire@pharmacien.mssante.fr"
NURSE = "claire.benoit@infirmier.mssante.fr"
CARDIOLOGIST = "nadia.bensaid@chu-glaciere.mssante.fr"
DOMAIN = GATEWAY.split("@")[1]


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[tuple[ImapServer, dict[str, Path]]]:
    paths = write_pki(tmp_path)
    with dovecot_for(tmp_path, paths) as server:
        yield server, paths


def _reader(outbox: Outbox, server: ImapServer, paths: dict[str, Path], **overrides: Any) -> MdnMailbox:
    """The gateway's poller on the plain port (STARTTLS), logging in with the mailbox's password."""
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "username": GATEWAY_USER,
        "password": GATEWAY_PASSWORD,
        "tls": tls_context(paths["server_ca"]),
        **overrides,
    }
    return MdnMailbox(outbox, ImapSettings(**values), domain=DOMAIN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _subjects(server: ImapServer, folder: str = "INBOX") -> list[str]:
    parse = BytesParser(policy=policy.default).parsebytes
    return [str(parse(raw, headersonly=True)["Subject"]) for _, _, raw in server.messages(GATEWAY_USER, folder)]


def _human_mail() -> bytes:
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = GP
    mail["To"] = GATEWAY
    mail["Subject"] = "Question about Mrs Durand's letter"
    mail.set_content("Bonjour, could you send the letter again as PDF?")
    return mail.as_bytes(policy=policy.SMTP)


def test_receipts_in_the_mailbox_are_applied_once_and_the_rest_is_left_for_people(
    world: dict[str, Any], imap: tuple[ImapServer, dict[str, Path]]
) -> None:
    server, paths = imap
    outbox: Outbox = world["outbox"]
    relay = world["relay"]
    state = _sent_s1(world)
    audit_before = len(outbox.audit_events())
    server.append(GATEWAY_USER, build_mdn(relay.to(GP), "processed"))
    server.append(GATEWAY_USER, build_mdn(relay.to(PHARMACIST), "processed/Error: 12^Document illisible"))
    server.append(GATEWAY_USER, _human_mail())
    forged = build_mdn(relay.to(CARDIOLOGIST), "processed", final_recipient="intruder@elsewhere.mssante.fr")
    server.append(GATEWAY_USER, forged)
    server.append(GATEWAY_USER, build_dsn(relay.to(NURSE), "failed"))
    # a shared mailbox: receipts for messages this gateway never sent are another application's
    server.append(GATEWAY_USER, b"Subject: not ours\r\n" + _raw_mdn("processed", message_id="<x-1@other.example>"))
    server.append(GATEWAY_USER, b"Subject: unknown\r\n" + _raw_mdn("processed", message_id=f"<x-2@{DOMAIN}>"))
    reader = _reader(outbox, server, paths)

    results = reader.poll_once()

    assert [r.status for r in results] == [
        "acknowledged",
        "dead-lettered",
        "ignored",
        "refused",
        "dead-lettered",
        "ignored",
        "ignored",
    ]
    assert state(GP) == ("acknowledged", None)
    assert state(PHARMACIST)[0] == "dead-lettered" and "12^Document illisible" in (state(PHARMACIST)[1] or "")
    assert state(NURSE)[0] == "dead-lettered" and "5.1.1" in (state(NURSE)[1] or ""), "a bounce, at once"
    assert state(CARDIOLOGIST)[0] == "sent", "an MDN from another mailbox proves nothing"
    assert len(outbox.audit_events()) == audit_before + 3
    # the applied receipts are gone (they return the letter itself); the others wait for a person
    left = ["Question about Mrs Durand's letter", "Accusé de traitement", "not ours", "unknown"]
    assert _subjects(server) == left
    assert all("\\Seen" not in flags for _, flags, _ in server.messages(GATEWAY_USER)), "read with PEEK"

    server.append(GATEWAY_USER, build_mdn(relay.to(GP), "processed"))  # the far end sends it twice
    again = reader.poll_once()
    assert [(r.status, r.detail) for r in again] == [
        ("ignored", "no delivery awaits an acknowledgement for this message")
    ]
    assert len(outbox.audit_events()) == audit_before + 3 and state(GP) == ("acknowledged", None)
    assert _subjects(server) == left, "the duplicate receipt is removed too"
    assert reader.poll_once() == [], "what was looked at is not read again"

    shown = generate_latest(outbox.metrics.registry).decode()
    assert 'gateway_mailbox_reads_total{outcome="ok"} 3.0' in shown
    assert 'gateway_mailbox_reads_total{outcome="failed"} 0.0' in shown, "present at 0: an alert can use it"
    assert 'gateway_mailbox_mails_total{outcome="acknowledged"} 1.0' in shown
    assert 'gateway_mailbox_mails_total{outcome="ignored"} 4.0' in shown
    restarted = _reader(outbox, server, paths)  # a new process reads the mail left there once more
    assert [r.status for r in restarted.poll_once()] == ["ignored", "refused", "ignored", "ignored"]
    assert len(outbox.audit_events()) == audit_before + 3 and _subjects(server) == left


def test_a_receipt_applied_but_not_removed_is_removed_next_time_and_changes_nothing(
    world: dict[str, Any], imap: tuple[ImapServer, dict[str, Path]]
) -> None:
    """Between the commit and the removal the gateway may die (here the removal fails: the done folder
    does not exist yet): the receipt is read again by the next poll, applied as a duplicate (nothing
    changes, nothing is audited twice) and then filed."""
    server, paths = imap
    outbox: Outbox = world["outbox"]
    state = _sent_s1(world)
    server.append(GATEWAY_USER, build_mdn(world["relay"].to(GP), "processed"))
    audit_before = len(outbox.audit_events())
    with pytest.raises(MailboxError, match="to Accusés traités"):
        _reader(outbox, server, paths, done_folder="Accusés traités").poll_once()
    assert state(GP) == ("acknowledged", None) and len(outbox.audit_events()) == audit_before + 1
    assert len(_subjects(server)) == 1, "the receipt is still in the mailbox"

    with server.client(GATEWAY_USER) as client:
        assert client.create(imap_folder("Accusés traités"))[0] == "OK"  # IMAP's modified UTF-7
    results = _reader(outbox, server, paths, done_folder="Accusés traités").poll_once()
    assert [r.status for r in results] == ["ignored"]
    assert len(outbox.audit_events()) == audit_before + 1
    assert _subjects(server) == [] and _subjects(server, "Accus&AOk-s trait&AOk-s") == ["Accusé de traitement"]


def test_a_database_failure_leaves_the_receipt_in_the_mailbox(
    world: dict[str, Any], imap: tuple[ImapServer, dict[str, Path]], tmp_path: Path
) -> None:
    server, paths = imap
    state = _sent_s1(world)
    server.append(GATEWAY_USER, build_mdn(world["relay"].to(GP), "processed"))
    engine = create_engine(f"sqlite:///{tmp_path / 'broken.db'}")
    broken = Outbox(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE delivery")  # a database that fails the look-up of the delivery
    with pytest.raises(Exception, match="no such table"):
        _reader(broken, server, paths).poll_once()
    assert len(_subjects(server)) == 1 and state(GP)[0] == "sent"
    assert [r.status for r in _reader(world["outbox"], server, paths).poll_once()] == ["acknowledged"]
    assert _subjects(server) == []


def test_the_mailbox_is_never_read_in_clear_nor_from_an_unchecked_server(
    world: dict[str, Any], imap: tuple[ImapServer, dict[str, Path]]
) -> None:
    """Implicit TLS with the mailbox's certificate (SASL EXTERNAL) works; an unknown server certificate,
    a wrong password or a foreign client certificate stop the poll with the mail untouched."""
    server, paths = imap
    outbox: Outbox = world["outbox"]
    state = _sent_s1(world)
    server.append(GATEWAY_USER, build_mdn(world["relay"].to(GP), "processed"))
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        _reader(outbox, server, paths, tls=tls_context(None)).poll_once()  # the system's CAs: not this server's
    with pytest.raises(MailboxError, match="LOGIN"):
        _reader(outbox, server, paths, password="wrong").poll_once()
    assert 'gateway_mailbox_reads_total{outcome="failed"} 2.0' in generate_latest(outbox.metrics.registry).decode()
    stranger = tls_context(paths["server_ca"], paths["stranger_cert"], paths["stranger_key"])
    with pytest.raises(MailboxError, match="EXTERNAL"):
        _reader(outbox, server, paths, password=None, tls=stranger).poll_once()
    assert len(_subjects(server)) == 1 and state(GP)[0] == "sent"
    own = tls_context(paths["server_ca"], paths["gateway_cert"], paths["gateway_key"])
    reader = _reader(outbox, server, paths, port=server.tls_port, implicit_tls=True, password=None, tls=own)
    assert [r.status for r in reader.poll_once()] == ["acknowledged"]
    assert state(GP) == ("acknowledged", None)


def test_the_poller_runs_in_the_background_until_stopped(
    world: dict[str, Any], imap: tuple[ImapServer, dict[str, Path]]
) -> None:
    server, paths = imap
    state = _sent_s1(world)
    reader = _reader(world["outbox"], server, paths, every=1.0)
    thread = reader.start()
    try:
        server.append(GATEWAY_USER, build_mdn(world["relay"].to(GP), "processed"))
        deadline = time.monotonic() + 20
        while state(GP)[0] != "acknowledged" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state(GP) == ("acknowledged", None)
    finally:
        reader.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_settings_from_the_environment(tmp_path: Path) -> None:
    """The IMAP account defaults to the SMTP relay's (one application mailbox, one certificate)."""
    smtp = SmtpSettings(host="smtp.operator.example", sender=GATEWAY, username="app-user", password="pw")
    outbox = Outbox(create_engine(f"sqlite:///{tmp_path / 'o.db'}"))
    assert mailbox_from_env(outbox, smtp, {}) is None
    secret = tmp_path / "imap-password"
    secret.write_text("from-file\n", encoding="utf-8")
    found = ImapSettings.from_env(
        smtp,
        {
            "GATEWAY_MDN_IMAP_URL": "imaps://imap.operator.example/Accus%C3%A9s",
            "GATEWAY_MDN_IMAP_PASSWORD_FILE": str(secret),
            "GATEWAY_MDN_IMAP_DONE_FOLDER": "Done",
            "GATEWAY_MDN_IMAP_POLL_SECONDS": "60",
        },
    )
    assert found is not None
    assert (found.host, found.port, found.implicit_tls, found.folder) == ("imap.operator.example", 993, True, "Accusés")
    assert (found.username, found.password, found.done_folder, found.every) == ("app-user", "from-file", "Done", 60.0)
    plain = ImapSettings.from_env(smtp, {"GATEWAY_MDN_IMAP_URL": "imap://imap.operator.example"})
    assert plain is not None and (plain.port, plain.implicit_tls, plain.folder, plain.password) == (
        143,
        False,
        "INBOX",
        "pw",
    )
    anonymous = SmtpSettings(host="smtp.operator.example", sender=GATEWAY)
    with pytest.raises(SettingsError, match=r"password .* or a client certificate"):
        ImapSettings.from_env(anonymous, {"GATEWAY_MDN_IMAP_URL": "imap://imap.operator.example"})
    paths = write_pki(tmp_path)
    by_certificate = ImapSettings.from_env(
        anonymous,
        {
            "GATEWAY_MDN_IMAP_URL": "imap://imap.operator.example:1143",
            **{
                f"GATEWAY_MDN_IMAP_{k}_FILE": str(paths[v])
                for k, v in {"CA": "server_ca", "CERT": "gateway_cert", "KEY": "gateway_key"}.items()
            },
        },
    )
    assert by_certificate is not None and by_certificate.password is None and by_certificate.port == 1143
    assert by_certificate.username == GATEWAY and by_certificate.tls is not None, (
        "the application mailbox, by certificate"
    )
    # RFC 3501 §5.1.3's own example, and what a French operator's folders look like
    assert imap_folder("~peter/mail/台北/日本語") == '"~peter/mail/&U,BTFw-/&ZeVnLIqe-"'
    assert imap_folder('Accusés "OK" & co') == '"Accus&AOk-s \\"OK\\" &- co"'
    with pytest.raises(SettingsError, match="line breaks"):
        imap_folder("INBOX\r\nA1 DELETE INBOX")
    for bad in ("pop3://x", "imap://", "imap://user@host", "imap://host:notaport", "imap://host?x=1"):
        with pytest.raises(SettingsError, match="GATEWAY_MDN_IMAP_URL"):
            ImapSettings.from_env(smtp, {"GATEWAY_MDN_IMAP_URL": bad})
    for every in ("0", "soon", "7200"):
        with pytest.raises(SettingsError, match="POLL_SECONDS"):
            ImapSettings.from_env(smtp, {"GATEWAY_MDN_IMAP_URL": "imap://h", "GATEWAY_MDN_IMAP_POLL_SECONDS": every})


def test_gateway_serve_reads_the_mailbox_its_environment_names(
    tmp_path: Path, imap: tuple[ImapServer, dict[str, Path]]
) -> None:
    """The real ``gateway serve`` process starts the poller from ``GATEWAY_MDN_IMAP_URL`` (and refuses
    the setting without an MSSanté relay): its reads show in ``/metrics``."""
    server, paths = imap
    gateway = str(Path(sys.executable).with_name("gateway"))
    secret = tmp_path / "imap-password"
    secret.write_text(GATEWAY_PASSWORD, encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
        "GATEWAY_API_KEYS": "admin-key-0123456789abcdef:admin",
        "GATEWAY_SIGNING_KEY_FILE": str(tmp_path / "keys" / "signing-key.jwk"),
        "GATEWAY_MDN_IMAP_URL": f"imap://{server.host}:{server.port}/INBOX",
        "GATEWAY_MDN_IMAP_USERNAME": GATEWAY_USER,
        "GATEWAY_MDN_IMAP_PASSWORD_FILE": str(secret),
        "GATEWAY_MDN_IMAP_CA_FILE": str(paths["server_ca"]),
        "GATEWAY_MDN_IMAP_POLL_SECONDS": "1",
    }
    made = subprocess.run([gateway, "keys", "generate", "--out", str(tmp_path / "keys")], env=env, check=False)
    assert made.returncode == 0
    port = _free_port()
    alone = subprocess.run(
        [gateway, "serve", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert alone.returncode != 0 and "set GATEWAY_SMTP_HOST too" in alone.stderr, alone.stderr[-2000:]

    env |= {"GATEWAY_SMTP_HOST": "smtp.operator.invalid", "GATEWAY_SMTP_SENDER": GATEWAY}  # never reached here
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([gateway, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, reads = time.monotonic() + 60, 0.0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while reads < 2 and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
                try:
                    shown = client.get("/metrics").text
                except httpx.TransportError:
                    continue
                found = re.search(r'gateway_mailbox_reads_total\{outcome="ok"\} (\S+)', shown)
                reads = float(found.group(1)) if found else 0.0
        assert reads >= 2, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
