"""Stage — seal (second half): encrypt a sealed message for a recipient that publishes a certificate.

Sign, then encrypt: the plaintext is the sealed Bundle's JSON (its detached JWS in ``Bundle.signature``
is untouched), and what travels is a JWE (RFC 7516) in the compact serialization, media type
``application/jose`` (``application/jose+json`` is accepted for the JSON serialization).  The content
key is wrapped with ``ECDH-ES+A256KW`` for an EC certificate (P-256, P-384, P-521) or ``RSA-OAEP-256``
for an RSA one (≥ 2048 bits); the content is encrypted with ``A256GCM``.  The protected header names the
recipient key by its RFC 7638 thumbprint (``kid``, which the receiver can compute from its private
key) and the certificate by ``x5t#S256``, and says what is inside (``cty: application/fhir+json``).
All of this is joserfc's work; nothing cryptographic is written by hand.

Where the certificate comes from: FHIR R4 ``Endpoint`` has no certificate element and neither IHE
mCSD nor the French Annuaire Santé IG (``interop.esante.gouv.fr/ig/fhir/annuaire``) defines an
extension for one.  Existing extensions elsewhere were looked at and not reused: HL7 AU Base
``http://hl7.org.au/fhir/StructureDefinition/encryption-certificate-pem-x509`` (Endpoint, PEM in
``valueString``, Australian jurisdiction), HL7 VhDir ``.../uv/vhdir/StructureDefinition/digitalcertificate``
(a complex extension, superseded by the US NDH ``base-ext-secureExchangeArtifacts``) and MedCom's
``smp-public-certificate`` (an eDelivery SMP key).  The gateway therefore declares its own,
:data:`gateway.directory.ENDPOINT_CERTIFICATE` (``profiles/StructureDefinition-endpoint-certificate.json``):
``valueBase64Binary`` holding the DER X.509 certificate.

A certificate is checked when it is used, at send time: it must parse, be valid at that instant, carry a
supported key, and — when it has a KeyUsage extension — allow key agreement (EC) or key encipherment
(RSA).  Anything else is a :class:`CryptError` and the delivery fails permanently; the gateway never
falls back to sending the message in clear.  With :class:`RecipientTrust` (``GATEWAY_RECIPIENT_CA_FILE``,
e.g. the IGC-Santé authorities) the certificate must also chain, at that instant, to one of them: a
directory entry that publishes any other certificate — a mistake, or someone who could write the
directory and wants to read the letters — is refused the same way.  Without it, the certificate is
trusted as the directory (which only ``admin`` callers write) holds it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from joserfc import jwe
from joserfc.errors import ExceededSizeError, JoseError
from joserfc.jwk import ECKey, RSAKey

from gateway.directory import ENDPOINT_CERTIFICATE
from gateway.errors import GatewayError
from gateway.settings import SettingsError

__all__ = [
    "ENDPOINT_CERTIFICATE",
    "JOSE",
    "JOSE_JSON",
    "CryptError",
    "RecipientKey",
    "RecipientTrust",
    "certificate_extension",
    "decrypt",
    "encrypt",
    "load_private_key",
    "recipient_key",
    "trust_from",
]

JOSE = "application/jose"  # compact serialization
JOSE_JSON = "application/jose+json"  # JSON serialization
ENC = "A256GCM"
EC_ALG = "ECDH-ES+A256KW"
RSA_ALG = "RSA-OAEP-256"
ALGORITHMS = (EC_ALG, RSA_ALG, ENC)  # the only ones accepted on decryption (no zip, no RSA1_5, no dir)
EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MIN_RSA_BITS = 2048
MAX_PLAINTEXT = 32 * 1024 * 1024  # a message Bundle is far smaller; joserfc's own default (64 KiB) is too small

JoseKey = ECKey | RSAKey  # joserfc's asymmetric keys (a private key also holds its public part)
PrivateKey = JoseKey


class CryptError(GatewayError):
    """A certificate that cannot be encrypted for, or a JWE that cannot be decrypted."""

    issue_code = "security"


@dataclass(frozen=True, slots=True)
class RecipientKey:
    """A recipient's public key, taken from a certificate that was valid when it was checked."""

    key: JoseKey  # public only
    alg: str  # key management algorithm for this key type
    kid: str  # RFC 7638 thumbprint of the public key
    x5t_s256: str  # base64url SHA-256 of the certificate's DER
    subject: str  # RFC 4514
    not_after: datetime

    def describe(self) -> str:
        return f"JWE {self.alg}/{ENC} for certificate x5t#S256={self.x5t_s256} ({self.subject})"


class _Registry(jwe.JWERegistry):
    max_ciphertext_length = MAX_PLAINTEXT + 16  # GCM adds no padding


REGISTRY = _Registry(algorithms=ALGORITHMS, verify_all_recipients=False)  # we hold one of the keys, not all


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def certificate_extension(der: bytes) -> dict[str, str]:
    """The Endpoint extension that publishes ``der`` (for directories and tests)."""
    return {"url": ENDPOINT_CERTIFICATE, "valueBase64Binary": base64.b64encode(der).decode("ascii")}


class RecipientTrust:
    """The authorities recipients' encryption certificates must be issued under (a PEM bundle).

    Every certificate of the bundle is a trust anchor, so a bundle holding a root and its intermediate
    (IGC-Santé's) accepts leaves of either.  The checks are cryptography's path validation (signatures,
    validity of every certificate at the instant, CA constraints); the leaf's own extensions are left to
    :func:`recipient_key` (an encryption certificate carries no TLS purpose).
    """

    def __init__(self, pem: bytes, name: str = "the recipients' CA file") -> None:
        try:
            self.authorities = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise CryptError(f"{name}: no PEM certificate in it") from None
        self._store = Store(self.authorities)
        self.name = name

    def check(self, cert: x509.Certificate, at: datetime, subject: str) -> None:
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(at)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
            .build_client_verifier()
        )
        try:
            verifier.verify(cert, [])
        except VerificationError as exc:
            raise CryptError(
                f"the recipient certificate ({subject}) is not issued under the trusted authorities ({self.name}): "
                f"{str(exc)[:200]}"
            ) from None


def trust_from(path: Path | None) -> RecipientTrust | None:
    """The :class:`RecipientTrust` of a PEM file (``GATEWAY_RECIPIENT_CA_FILE``), None without one; a file
    that cannot be read or holds no certificate stops the start (no silent fall back to trusting all)."""
    if path is None:
        return None
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"GATEWAY_RECIPIENT_CA_FILE: {path}: {exc.strerror}") from None
    try:
        return RecipientTrust(pem, path.name)
    except CryptError as exc:
        raise SettingsError(f"GATEWAY_RECIPIENT_CA_FILE: {exc.message}") from None


def recipient_key(der: bytes, at: datetime, trust: RecipientTrust | None = None) -> RecipientKey:
    """Check a recipient's DER certificate for use at ``at`` (and that it chains to ``trust``'s
    authorities, when given) and return its encryption key."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise CryptError("the recipient certificate is not a DER X.509 certificate") from None
    subject = cert.subject.rfc4514_string() or "(no subject)"
    if at < cert.not_valid_before_utc:
        raise CryptError(
            f"the recipient certificate ({subject}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
        )
    if at > cert.not_valid_after_utc:
        raise CryptError(f"the recipient certificate ({subject}) expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if trust is not None:
        trust.check(cert, at, subject)
    public = cert.public_key()
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    key: JoseKey
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in EC_CURVES:
            raise CryptError(f"the recipient certificate has an EC key on {public.curve.name}: not supported")
        if usage is not None and not usage.key_agreement:
            raise CryptError(f"the recipient certificate ({subject}) does not allow key agreement: not for encryption")
        key, alg = ECKey.import_key(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)), EC_ALG
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise CryptError(f"the recipient certificate has a {public.key_size}-bit RSA key: at least {MIN_RSA_BITS}")
        if usage is not None and not usage.key_encipherment:
            raise CryptError(
                f"the recipient certificate ({subject}) does not allow key encipherment: not for encryption"
            )
        key, alg = RSAKey.import_key(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)), RSA_ALG
    else:
        raise CryptError(f"the recipient certificate has a {type(public).__name__} key: only EC and RSA are supported")
    return RecipientKey(
        key, alg, key.thumbprint(), _b64url(hashlib.sha256(der).digest()), subject, cert.not_valid_after_utc
    )


def encrypt(plaintext: bytes, recipient: RecipientKey) -> bytes:
    """The JWE compact serialization of ``plaintext`` (the sealed Bundle's JSON) for ``recipient``."""
    header = {
        "alg": recipient.alg,
        "enc": ENC,
        "kid": recipient.kid,
        "x5t#S256": recipient.x5t_s256,
        "cty": "application/fhir+json",
    }
    if len(plaintext) > MAX_PLAINTEXT:
        raise CryptError(f"the message is over {MAX_PLAINTEXT} bytes: too large to encrypt")
    try:
        return jwe.encrypt_compact(header, plaintext, recipient.key, registry=REGISTRY).encode("ascii")
    except (JoseError, ValueError) as exc:  # pragma: no cover - the key was checked by recipient_key
        raise CryptError(f"encryption failed: {exc}") from None


def load_private_key(data: bytes) -> PrivateKey:
    """A recipient's private decryption key (EC or RSA) from PEM or JWK bytes."""
    try:
        parsed: Any = orjson.loads(data) if data.lstrip()[:1] == b"{" else data
    except orjson.JSONDecodeError:
        raise CryptError("not a JWK: malformed JSON") from None
    for kind in (ECKey, RSAKey):
        try:
            key: PrivateKey = kind.import_key(parsed)
        except (ValueError, TypeError, JoseError):
            continue
        if not key.is_private:
            raise CryptError("a decryption key must be a private key")
        return key
    raise CryptError("not an EC or RSA private key (PEM or JWK)")


def _b64json(segment: str) -> Any:
    return orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _headers(body: bytes, media_type: str) -> tuple[list[dict[str, Any]], Any]:
    """Each recipient's full JOSE header (protected + shared + per-recipient), and the value joserfc
    decrypts (the compact bytes, or the JSON object)."""
    try:
        if media_type == JOSE_JSON:
            value = orjson.loads(body)
            protected = _b64json(value["protected"])
            shared = value.get("unprotected") or {}
            own = (
                [r.get("header") or {} for r in value["recipients"]]
                if "recipients" in value
                else [value.get("header") or {}]
            )
            headers = [{**protected, **shared, **header} for header in own]
        else:
            value = body.strip()
            headers = [_b64json(value.split(b".")[0].decode("ascii"))]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise CryptError("the body is not a JWE") from None
    if not headers or not all(isinstance(h, dict) for h in headers):
        raise CryptError("the JWE header is not a JSON object")
    return headers, value


def decrypt(body: bytes, keys: Iterable[PrivateKey], media_type: str = JOSE) -> bytes:
    """The plaintext of a JWE addressed to one of ``keys`` (the key named by ``kid`` is tried first)."""
    headers, value = _headers(body, media_type)
    for header in headers:
        if header.get("alg") not in (EC_ALG, RSA_ALG) or header.get("enc") != ENC or "zip" in header:
            raise CryptError(
                f"JWE {header.get('alg')}/{header.get('enc')} refused: only {EC_ALG} or {RSA_ALG} with {ENC}"
            )
    kids = {h.get("kid") for h in headers}
    candidates = sorted(keys, key=lambda k: k.thumbprint() not in kids)
    for key in candidates:
        try:
            if media_type == JOSE_JSON:
                return bytes(jwe.decrypt_json(value, key, registry=REGISTRY).plaintext or b"")
            return bytes(jwe.decrypt_compact(value, key, registry=REGISTRY).plaintext or b"")
        except ExceededSizeError:
            raise CryptError(f"the JWE is over the size limit ({MAX_PLAINTEXT} bytes of content)") from None
        except (JoseError, ValueError, TypeError, KeyError):
            continue
    raise CryptError("the JWE cannot be decrypted with this recipient's keys: altered, or encrypted for someone else")
