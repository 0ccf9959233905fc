"""Encryption for recipients that publish a certificate: JWE round trips, refusals, certificate checks."""

from __future__ import annotations

import base64
import copy
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from joserfc import jwe
from joserfc.jwk import ECKey

from gateway import crypt
from gateway.directory import Directory, Endpoint
from gateway.policy import policy_from
from gateway.receiver import create_receiver
from gateway.seal import Signer, generate_key, sign, verify
from gateway.transports import Outcome
from tests import pki
from tests.conftest import mappings
from tests.dispatch_cases import run

CA = pki.ca()
EC_RECIPIENT = pki.issue(CA, "gp-roussel", encryption=True)
RSA_RECIPIENT = pki.issue(CA, "saad-domicile", encryption=True, rsa_bits=2048)
OTHER = pki.issue(CA, "someone-else", encryption=True)
SIGNER = Signer(generate_key())
NOW = pki.NOW


def _key(issued: pki.Issued) -> crypt.PrivateKey:
    return crypt.load_private_key(issued.key_pem)


def _sealed() -> bytes:
    message = copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"])
    return orjson.dumps(sign(message, SIGNER, "2026-10-30T11:30:00+01:00"))


@pytest.mark.parametrize(("recipient", "alg"), [(EC_RECIPIENT, "ECDH-ES+A256KW"), (RSA_RECIPIENT, "RSA-OAEP-256")])
def test_sign_then_encrypt_round_trip(recipient: pki.Issued, alg: str) -> None:
    sealed = _sealed()
    target = crypt.recipient_key(recipient.der, NOW)
    assert target.alg == alg
    token = crypt.encrypt(sealed, target)
    parts = token.split(b".")
    assert len(parts) == 5 and b"gp-roussel" not in token and b"MessageHeader" not in token
    header = orjson.loads(base64.urlsafe_b64decode(parts[0] + b"=" * (-len(parts[0]) % 4)))
    assert header["alg"] == alg and header["enc"] == "A256GCM" and header["cty"] == "application/fhir+json"
    assert header["kid"] == _key(recipient).thumbprint()  # the receiver finds its key from its private key alone
    plain = crypt.decrypt(token, [_key(OTHER), _key(recipient)])
    assert plain == sealed
    verify(orjson.loads(plain), [SIGNER.key])  # the seal inside is intact


def test_the_json_serialization_is_accepted_too() -> None:
    target = crypt.recipient_key(EC_RECIPIENT.der, NOW)
    obj = jwe.FlattenedJSONEncryption({"enc": "A256GCM"}, b'{"resourceType":"Bundle"}')
    obj.add_recipient({"alg": "ECDH-ES+A256KW", "kid": target.kid}, target.key)
    body = orjson.dumps(jwe.encrypt_json(obj, None, algorithms=crypt.ALGORITHMS))
    assert crypt.decrypt(body, [_key(EC_RECIPIENT)], crypt.JOSE_JSON) == b'{"resourceType":"Bundle"}'


def test_a_tampered_jwe_or_another_recipients_key_cannot_decrypt() -> None:
    token = crypt.encrypt(_sealed(), crypt.recipient_key(EC_RECIPIENT.der, NOW))
    head, key, iv, ciphertext, tag = token.split(b".")
    flipped = bytearray(base64.urlsafe_b64decode(ciphertext + b"=" * (-len(ciphertext) % 4)))
    flipped[10] ^= 0x01
    tampered = b".".join([head, key, iv, base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"="), tag])
    with pytest.raises(crypt.CryptError, match="cannot be decrypted"):
        crypt.decrypt(tampered, [_key(EC_RECIPIENT)])
    with pytest.raises(crypt.CryptError, match="cannot be decrypted"):
        crypt.decrypt(token, [_key(OTHER), _key(RSA_RECIPIENT)])
    with pytest.raises(crypt.CryptError, match="not a JWE"):
        crypt.decrypt(b"{not a jwe", [_key(EC_RECIPIENT)])


def test_weak_or_unexpected_algorithms_are_refused_before_any_key_is_tried() -> None:
    recipient = _key(EC_RECIPIENT)
    public = ECKey.import_key(recipient.as_dict(private=False))
    for header in ({"alg": "ECDH-ES", "enc": "A256GCM"}, {"alg": "ECDH-ES+A256KW", "enc": "A128CBC-HS256"}):
        token = jwe.encrypt_compact(header, b"{}", public)
        with pytest.raises(crypt.CryptError, match="refused"):
            crypt.decrypt(token.encode(), [recipient])
    zipped = jwe.encrypt_compact({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "zip": "DEF"}, b"{}" * 100, public)
    with pytest.raises(crypt.CryptError, match="refused"):
        crypt.decrypt(zipped.encode(), [recipient])


def test_certificates_that_cannot_be_encrypted_for_are_refused_with_the_reason() -> None:
    expired = pki.issue(
        CA, "old", encryption=True, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=1)
    )
    future = pki.issue(CA, "new", encryption=True, not_before=NOW + timedelta(days=1))
    signing_only = pki.issue(CA, "signer", client=True)  # KeyUsage digitalSignature only
    weak = pki.issue(CA, "weak", encryption=True, rsa_bits=1024)
    cases = {
        b"not a certificate": "not a DER X.509",
        expired.der: "expired on",
        future.der: "not valid before",
        signing_only.der: "does not allow key agreement",
        weak.der: "1024-bit RSA",
    }
    for der, reason in cases.items():
        with pytest.raises(crypt.CryptError, match=reason):
            crypt.recipient_key(der, NOW)
    # valid yesterday, checked at send time: the clock of the attempt decides
    assert crypt.recipient_key(expired.der, NOW - timedelta(days=2)).subject == "CN=old"


def test_private_keys_load_from_pem_or_jwk_and_public_keys_are_refused() -> None:
    assert crypt.load_private_key(EC_RECIPIENT.key_pem).is_private
    assert crypt.load_private_key(RSA_RECIPIENT.key_pem).is_private
    jwk = orjson.dumps(_key(EC_RECIPIENT).as_dict(private=True))
    assert crypt.load_private_key(jwk).thumbprint() == _key(EC_RECIPIENT).thumbprint()
    with pytest.raises(crypt.CryptError, match="private"):
        crypt.load_private_key(EC_RECIPIENT.cert_pem)
    with pytest.raises(crypt.CryptError):
        crypt.load_private_key(b"garbage")


def test_the_directory_reads_the_endpoint_certificate_extension() -> None:
    def bundle(extension: list[dict[str, str]]) -> dict[str, object]:
        return {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Organization", "id": "o", "endpoint": [{"reference": "Endpoint/e"}]}},
                {
                    "resource": {
                        "resourceType": "Endpoint",
                        "id": "e",
                        "status": "active",
                        "address": "https://rx.example/fhir",
                        "extension": extension,
                    }
                },
            ],
        }

    policy = policy_from(mappings())
    found = Directory(bundle([crypt.certificate_extension(EC_RECIPIENT.der)]), policy).get("Organization/o")
    assert found is not None and found.endpoint is not None and found.endpoint.certificate == EC_RECIPIENT.der
    plain = Directory(bundle([]), policy).get("Organization/o")
    assert plain is not None and plain.endpoint is not None and plain.endpoint.certificate is None
    # a broken value is kept (and then fails as a certificate): never read as "no certificate"
    broken = Directory(bundle([{"url": crypt.ENDPOINT_CERTIFICATE, "valueBase64Binary": "@@@"}]), policy)
    endpoint = broken.get("Organization/o").endpoint  # type: ignore[union-attr]
    assert endpoint is not None and endpoint.certificate is not None
    with pytest.raises(crypt.CryptError):
        crypt.recipient_key(endpoint.certificate, NOW)


class _PlainTransport:
    """A transport written against the original contract: FHIR JSON only, no ``media_types``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        self.sent.append(payload)
        return Outcome("sent", "handed over")

    def close(self) -> None:
        return None


def test_the_worker_never_falls_back_to_clear_text() -> None:
    from gateway.deliver import _send_sealed

    def endpoint(certificate: bytes | None) -> Endpoint:
        return Endpoint("Endpoint/e", "mailto:gp@medecin.mssante.fr", "direct-project", {}, certificate)

    plain = _PlainTransport()
    outcome, how = _send_sealed(plain, b"{}", endpoint(None), "m1", NOW)
    assert outcome.kind == "sent" and plain.sent == [b"{}"] and "not encrypted" in how
    # a certificate, but a transport that cannot carry a JWE: refused, nothing handed over
    outcome, how = _send_sealed(plain, b"{}", endpoint(EC_RECIPIENT.der), "m2", NOW)
    assert outcome.kind == "permanent" and "cannot carry a JWE" in outcome.detail and "not sent in clear" in how
    assert plain.sent == [b"{}"]


def test_the_receiver_decrypts_refuses_what_it_cannot_and_may_require_encryption(tmp_path: Path) -> None:
    token = crypt.encrypt(_sealed(), crypt.recipient_key(EC_RECIPIENT.der, NOW))
    jose = {"Content-Type": crypt.JOSE}
    keyless = create_receiver(f"sqlite:///{tmp_path / 'a.db'}", [SIGNER.key])
    strict = create_receiver(
        f"sqlite:///{tmp_path / 'b.db'}", [SIGNER.key], decryption_keys=[_key(EC_RECIPIENT)], require_encryption=True
    )
    with TestClient(keyless) as client:
        answer = client.post("/$process-message", content=token, headers=jose)
        assert answer.status_code == 400 and answer.json()["issue"][0]["code"] == "security"
    with TestClient(strict) as client:
        answer = client.post("/$process-message", content=_sealed(), headers={"Content-Type": "application/fhir+json"})
        assert answer.status_code == 400 and "only encrypted" in answer.json()["issue"][0]["diagnostics"]
        answer = client.post("/$process-message", content=token, headers={"Content-Type": "application/jose; q=1"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["entry"][0]["resource"]["response"]["code"] == "ok"


class _JoseTransport(_PlainTransport):
    """A transport that carries JWEs too (as the HTTP one does)."""

    media_types = frozenset({"application/fhir+json", crypt.JOSE})

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = "") -> Outcome:
        self.sent.append(payload)
        return Outcome("sent", "handed over")


def test_with_trusted_authorities_only_their_certificates_are_encrypted_for(tmp_path: Path) -> None:
    """``GATEWAY_RECIPIENT_CA_FILE``: a published certificate must chain to one of the authorities at send
    time; one from anyone else (a wrong entry, or someone who wrote the directory to read the letters) is
    refused like an expired one — the delivery fails permanently and nothing is sent, in clear or not."""
    from gateway.deliver import _send_sealed

    bundle = tmp_path / "igc-sante.pem"
    bundle.write_bytes(pki.ca("Another authority").cert_pem + CA.cert_pem)  # a bundle: any of them anchors
    trust = crypt.trust_from(bundle)
    assert trust is not None and len(trust.authorities) == 2
    assert crypt.recipient_key(EC_RECIPIENT.der, NOW, trust).subject == "CN=gp-roussel"
    assert crypt.recipient_key(RSA_RECIPIENT.der, NOW, trust).alg == "RSA-OAEP-256"
    intruder = pki.issue(pki.ca("Intruder CA"), "gp-roussel", encryption=True)
    with pytest.raises(crypt.CryptError, match="not issued under the trusted authorities"):
        crypt.recipient_key(intruder.der, NOW, trust)
    crypt.recipient_key(intruder.der, NOW)  # without the setting, the directory's certificate is taken as it is
    self_signed = pki.ca("gp-roussel")
    with pytest.raises(crypt.CryptError, match="not issued under"):
        crypt.recipient_key(self_signed.der, NOW, trust)

    def endpoint(certificate: bytes) -> Endpoint:
        return Endpoint("Endpoint/e", "https://gp.example/fhir", "hl7-fhir-msg", {}, certificate)

    transport, sealed = _JoseTransport(), _sealed()
    outcome, how = _send_sealed(transport, sealed, endpoint(intruder.der), "m1", NOW, trust)
    assert outcome.kind == "permanent" and "not issued under" in outcome.detail and "not sent in clear" in how
    assert transport.sent == []
    outcome, how = _send_sealed(transport, sealed, endpoint(EC_RECIPIENT.der), "m2", NOW, trust)
    assert outcome.kind == "sent" and "signed and encrypted" in how and len(transport.sent) == 1
    assert crypt.decrypt(transport.sent[0], [_key(EC_RECIPIENT)]) == sealed


def test_a_recipient_ca_file_that_cannot_be_used_stops_the_start(tmp_path: Path) -> None:
    from gateway.settings import SettingsError

    assert crypt.trust_from(None) is None
    with pytest.raises(SettingsError, match=r"GATEWAY_RECIPIENT_CA_FILE: .*missing\.pem"):
        crypt.trust_from(tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"not a certificate\n")
    with pytest.raises(SettingsError, match="no PEM certificate"):
        crypt.trust_from(empty)
