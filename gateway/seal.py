"""Stage — seal: sign a message Bundle so a receiver can check who sent it and that nothing changed.

The signature is a detached JWS (RFC 7515 appendix F: ``header..signature``), ES256 with the
gateway's P-256 key, over the canonical JSON of the Bundle *without* its ``signature`` element, and it
travels in ``Bundle.signature`` (R4 Signature: type, when, who, ``sigFormat = application/jose``).
Canonical JSON here is RFC 8785 (JCS) as far as this gateway's content needs: keys sorted, no
whitespace, UTF-8, integers and short decimals as JSON numbers; it is what ``orjson`` writes with
sorted keys.  Keys are handled by joserfc (a maintained JOSE library), never by hand.

Encryption for recipients that publish a certificate is :mod:`gateway.crypt` (JWE over the sealed bytes).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from joserfc.util import json_b64decode, json_b64encode, urlsafe_b64decode

from gateway.errors import GatewayError

__all__ = ["SealError", "Signer", "canonical", "generate_key", "load_key", "sign", "sign_bytes", "verify"]

Json = dict[str, Any]
SIGNATURE_TYPE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.14",
    "display": "Source Signature",
}


class SealError(GatewayError):
    """A message whose signature is missing, malformed, from an unknown key, or does not match."""

    issue_code = "security"


def canonical(resource: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8 (RFC 8785 for our content)."""
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


def generate_key() -> ECKey:
    """A new P-256 signing key (its ``kid`` is its RFC 7638 thumbprint)."""
    key = ECKey.generate_key("P-256", auto_kid=True)
    return key


def load_key(data: bytes) -> ECKey:
    """A P-256 key from a JWK (JSON) or PEM file's bytes.  A PEM carries no ``kid``: it gets its RFC 7638
    thumbprint, the ``kid`` receivers compute from the same key (not the string "None")."""
    try:
        key = ECKey.import_key(orjson.loads(data)) if data.lstrip()[:1] == b"{" else ECKey.import_key(data)
    except (ValueError, TypeError, JoseError, orjson.JSONDecodeError) as exc:
        raise SealError(f"not an EC key (JWK or PEM): {str(exc).splitlines()[0][:80]}") from None
    key.ensure_kid()
    return key


@dataclass(frozen=True, slots=True)
class Signer:
    """The gateway's signing identity."""

    key: ECKey
    who: str = "discharge-gateway"

    @property
    def kid(self) -> str:
        return str(self.key.kid)


# the registry ``jws.serialize_compact(..., algorithms=["ES256"])`` would build on every call
_REGISTRY = jws.JWSRegistry(algorithms=["ES256"])
_ES256 = _REGISTRY.get_alg("ES256")


def _b64url(data: bytes) -> bytes:
    """``joserfc.util.urlsafe_b64encode`` (base64url without padding), one pass fewer on a large payload;
    ``replace`` hops from one ``+`` (or ``/``) to the next with memchr: ten times quicker than ``translate``."""
    return binascii.b2a_base64(data, newline=False).replace(b"+", b"-").replace(b"/", b"_").rstrip(b"=")


def _signature(payload: bytes, signer: Signer, when: str) -> Json:
    """The R4 Signature element of a detached JWS over ``payload`` (the canonical JSON of the unsigned Bundle).

    The steps of ``jws.serialize_compact`` (joserfc's header and key checks, joserfc's ES256), without
    building the attached form only to cut its payload out again: the payload is most of a message.
    """
    header = {"alg": "ES256", "kid": signer.kid, "typ": "application/fhir+json"}
    _REGISTRY.check_header(header)
    _ES256.check_key(signer.key)
    head = json_b64encode(header)
    signature = _ES256.sign(head + b"." + _b64url(payload), signer.key)
    detached = head + b".." + _b64url(signature)
    return {
        "type": [SIGNATURE_TYPE],
        "when": when,
        "who": {"display": signer.who},
        "sigFormat": "application/jose",
        "data": base64.b64encode(detached).decode("ascii"),
    }


def sign(bundle: Mapping[str, Any], signer: Signer, when: str) -> Json:
    """A copy of the Bundle carrying a detached JWS over its canonical JSON (without ``signature``)."""
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    return {**unsigned, "signature": _signature(canonical(unsigned), signer, when)}


def sign_bytes(bundle: Mapping[str, Any], signer: Signer, when: str) -> bytes:
    """:func:`sign`, serialised: the JSON of the signed Bundle, as a transport sends it.

    The canonical JSON the signature covers is written once and sent as it is, with the ``signature``
    element added before its closing brace (JSON objects are unordered: a receiver takes the element
    out and canonicalises the rest again, :func:`verify`), instead of serialising the message twice.
    """
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    payload = canonical(unsigned)
    element = orjson.dumps(_signature(payload, signer, when))
    return payload[:-1] + (b',"signature":' if len(payload) > 2 else b'"signature":') + element + b"}"


def verify(bundle: Mapping[str, Any], keys: Iterable[ECKey]) -> str:
    """Check the Bundle's signature against trusted public keys; returns the signing ``kid``.

    What ``jws.deserialize_compact(head..sig, key, algorithms=["ES256"], payload=...)`` checks — joserfc's
    header size and parameter checks, its key check and its ES256 — plus a refusal of ``b64``/``crit``
    (RFC 7797 would sign the payload unencoded: never what :func:`sign` writes).  The signing input is
    built as :func:`sign` builds it, with the registry built once and the header decoded once.
    """
    signature = bundle.get("signature")
    if not isinstance(signature, Mapping) or signature.get("sigFormat") != "application/jose":
        raise SealError("the message carries no JWS signature")
    try:
        head, empty, sig = base64.b64decode(str(signature.get("data", "")), validate=True).split(b".")
    except ValueError:
        raise SealError("the message signature is malformed") from None
    if empty:
        raise SealError("the JWS is not detached: refusing a signature that carries its own payload")
    try:
        _REGISTRY.validate_header_size(head)
        header = json_b64decode(head)  # joserfc's strict base64url (no padding, canonical last character)
    except (ValueError, TypeError, JoseError):
        header = None
    if not isinstance(header, dict):
        raise SealError("the JWS header is malformed")
    trusted = {str(k.kid): k for k in keys}
    key = trusted.get(str(header.get("kid")))
    if key is None:
        raise SealError(f"the message is signed by an unknown key {header.get('kid')!r}")
    if header.get("alg") != "ES256" or "b64" in header or "crit" in header:
        raise SealError(f"the JWS header is not accepted: only ES256, no b64/crit (alg {header.get('alg')!r})")
    try:
        _REGISTRY.check_header(header)  # joserfc's: value types, registered parameters only
        _ES256.check_key(key)  # an EC P-256 key whose use/alg allow ES256 signatures
        _REGISTRY.validate_signature_size(sig)
        raw = urlsafe_b64decode(sig)
    except (ValueError, TypeError, JoseError):
        raise SealError("the signature does not match the message: it was altered or signed by another key") from None
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    try:  # the detached form (RFC 7515 appendix F): the payload is the canonical JSON beside the compact value
        valid = _ES256.verify(head + b"." + _b64url(canonical(unsigned)), raw, key)
    except JoseError:  # e.g. a trusted key whose key_ops exclude "verify"
        valid = False
    if not valid:
        raise SealError("the signature does not match the message: it was altered or signed by another key")
    return str(key.kid)
