"""Caller authentication: API key, client certificate (ASGI TLS extension), or either — decided per mode."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway.api import auth
from gateway.api.outcomes import ApiError
from gateway.settings import SettingsError
from gateway.transports.http import tls_context
from tests import pki

CA = pki.ca()
HIS = pki.issue(CA, "his", client=True)
OTHER = pki.issue(CA, "other", client=True)
KEYS = {"admin-key-0123456789abcdef": frozenset({"admin"})}
CERTS = {auth.fingerprint(HIS.der): frozenset({"his"})}


def _scope(der: bytes | None = None, error: str | None = None) -> dict[str, Any]:
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {"type": "http", "extensions": {"tls": {"client_cert_chain": chain, "client_cert_error": error}}}


def _refused(client_auth: auth.ClientAuth, scope: dict[str, Any], key: str | None) -> str:
    with pytest.raises(ApiError) as caught:
        client_auth.roles(scope, key, KEYS)
    assert caught.value.status == 401 and caught.value.code == "login"
    return caught.value.message


def test_api_key_mode_ignores_certificates() -> None:
    keys_only = auth.ClientAuth()
    assert keys_only.roles({}, "admin-key-0123456789abcdef", KEYS) == {"admin"}
    assert "API key" in _refused(keys_only, _scope(HIS.der), None)
    assert keys_only.cert_reqs == ssl.CERT_NONE


def test_client_cert_mode_ignores_api_keys() -> None:
    certs_only = auth.ClientAuth("client-cert", CERTS)
    assert certs_only.roles(_scope(HIS.der), None, KEYS) == {"his"}
    assert certs_only.roles(_scope(HIS.der), "admin-key-0123456789abcdef", KEYS) == {"his"}
    assert "client certificate" in _refused(certs_only, {}, "admin-key-0123456789abcdef")
    assert "not authorised" in _refused(certs_only, _scope(OTHER.der), None)
    assert certs_only.cert_reqs == ssl.CERT_REQUIRED


def test_both_mode_accepts_either_and_a_wrong_key_is_not_rescued_by_a_certificate() -> None:
    either = auth.ClientAuth("both", CERTS)
    assert either.roles({}, "admin-key-0123456789abcdef", KEYS) == {"admin"}
    assert either.roles(_scope(HIS.der), None, KEYS) == {"his"}
    assert "not valid" in _refused(either, _scope(HIS.der), "wrong-key-0123456789abcdef")
    assert "API key or a known client certificate" in _refused(either, {}, None)
    assert "API key or a known client certificate" in _refused(either, _scope(HIS.der, error="expired"), None)
    assert either.cert_reqs == ssl.CERT_OPTIONAL


def test_client_certificate_mapping_is_parsed_like_api_keys() -> None:
    digest = auth.fingerprint(HIS.der)
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    text = f"# HIS of the CHU\n{colons}:his+auditor, sha256={auth.fingerprint(OTHER.der)}:admin\n"
    assert auth.parse_client_certificates(text) == {
        digest: frozenset({"his", "auditor"}),
        auth.fingerprint(OTHER.der): frozenset({"admin"}),
    }
    for bad in (f"{digest}:root", f"{digest}", "abcd:his", f"{digest}:"):
        with pytest.raises(SettingsError):
            auth.parse_client_certificates(bad)


def test_configuration_errors_are_settings_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_AUTH"):
        auth.ClientAuth("certificate")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="GATEWAY_CLIENT_CERTS"):
        auth.ClientAuth("both")
    cert, key = HIS.write(tmp_path, "his")
    with pytest.raises(SettingsError, match="GATEWAY_TLS_CA_FILE"):
        auth.uvicorn_tls_options(cert, key, None, ssl.CERT_OPTIONAL)
    with pytest.raises(SettingsError, match=r"missing\.pem"):
        auth.uvicorn_tls_options(tmp_path / "missing.pem", key, None, ssl.CERT_NONE)
    with pytest.raises(SettingsError, match="no such file"):
        tls_context(tmp_path / "missing-ca.pem")
    with pytest.raises(SettingsError, match="cannot load"):
        tls_context(None, key, cert)  # certificate and key swapped
    assert tls_context(None, cert, key).minimum_version == ssl.TLSVersion.TLSv1_2


def test_each_client_has_its_own_stable_name() -> None:
    from fastapi import FastAPI
    from starlette.requests import Request

    app = FastAPI()
    auth.install(app, auth.ClientAuth("both", CERTS))

    def request(der: bytes | None) -> Request:
        return Request({**_scope(der), "app": app, "headers": []})

    key = "admin-key-0123456789abcdef"
    assert auth.client_id(request(None), key) == auth.client_id(request(HIS.der), key)  # the key decides
    assert auth.client_id(request(None), key).startswith("client-")
    assert auth.client_id(request(HIS.der), None) == "cert-" + auth.fingerprint(HIS.der)[:16]
    assert auth.client_id(request(HIS.der), None) != auth.client_id(request(OTHER.der), None)
