"""The Dovecot test fixture itself: STARTTLS-only logins, implicit TLS, append/fetch round trip, SASL EXTERNAL."""

from __future__ import annotations

import imaplib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imap_server import DOVECOT, GATEWAY_PASSWORD, GATEWAY_USER, ImapServer, dovecot_for, write_pki

# skipped where Dovecot is not installed (apt-get install dovecot-imapd), never under CI: .ci/run installs it
pytestmark = pytest.mark.skipif(DOVECOT is None and not os.environ.get("CI"), reason="dovecot is not installed")


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return write_pki(tmp_path)


@pytest.fixture
def server(tmp_path: Path, paths: dict[str, Path]) -> Iterator[ImapServer]:
    with dovecot_for(tmp_path, paths, client_certificates=False) as running:
        yield running


def test_plain_port_requires_starttls_before_login(server: ImapServer) -> None:
    imap = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        assert "STARTTLS" in imap.capabilities and "LOGINDISABLED" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="Plaintext authentication disallowed"):
            imap.login(GATEWAY_USER, GATEWAY_PASSWORD)
        imap.starttls(server.ssl_context())
        assert imap.login(GATEWAY_USER, GATEWAY_PASSWORD)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
    finally:
        imap.logout()
    with imaplib.IMAP4(server.host, server.port, timeout=10) as imap:
        imap.starttls(server.ssl_context())
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(GATEWAY_USER, "wrong")


def test_implicit_tls_and_append_round_trip(server: ImapServer) -> None:
    with imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=server.ssl_context(), timeout=10) as imap:
        assert imap.login(GATEWAY_USER, GATEWAY_PASSWORD)[0] == "OK"
    receipt = b"From: a@b.example\r\nSubject: MDN\r\nContent-Type: text/plain\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
    server.append(GATEWAY_USER, receipt)
    server.append(GATEWAY_USER, b"Subject: two\r\n\r\nx\r\n", flags=["\\Seen"])
    server.append(GATEWAY_USER, b"Subject: done\r\n\r\ny\r\n", "MDN/Processed")
    inbox = server.messages(GATEWAY_USER)
    assert [(uid, raw) for uid, _, raw in inbox] == [(1, receipt), (2, b"Subject: two\r\n\r\nx\r\n")]
    assert "\\Seen" in inbox[1][1] and "\\Seen" not in inbox[0][1]
    assert server.messages(GATEWAY_USER, "MDN/Processed")[0][2] == b"Subject: done\r\n\r\ny\r\n"
    assert set(server.folders(GATEWAY_USER)) >= {"INBOX", "MDN", "MDN/Processed"}
    assert server.messages("other@gw.example") == []


def test_client_certificate_sasl_external(tmp_path: Path, paths: dict[str, Path]) -> None:
    with dovecot_for(tmp_path, paths) as server:
        context = server.ssl_context(cert=(paths["gateway_cert"], paths["gateway_key"]))
        with imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=context, timeout=10) as imap:
            assert "AUTH=EXTERNAL" in imap.capabilities
            assert imap.authenticate("EXTERNAL", lambda _: b"")[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"
        with imaplib.IMAP4(server.host, server.port, timeout=10) as imap:  # STARTTLS port too
            imap.starttls(context)
            assert imap.authenticate("EXTERNAL", lambda _: b"")[0] == "OK"
        stranger = server.ssl_context(cert=(paths["stranger_cert"], paths["stranger_key"]))
        for refused in (server.ssl_context(), stranger):  # no certificate / one from another CA
            with (
                imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=refused, timeout=10) as imap,
                pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
            ):
                imap.authenticate("EXTERNAL", lambda _: b"")
        with (  # the password-less EXTERNAL passdb is not for LOGIN
            imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=context, timeout=10) as imap,
            pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
        ):
            imap.login(GATEWAY_USER, "")
        assert server.messages(GATEWAY_USER) == []  # password logins still work alongside
