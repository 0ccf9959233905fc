"""Sealed messages verify, and any change, missing signature or foreign key is refused."""

from __future__ import annotations

import copy

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle

from gateway.seal import SealError, Signer, generate_key, sign, sign_bytes, verify
from tests.dispatch_cases import run


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(generate_key())


def _message() -> dict:  # type: ignore[type-arg]
    return copy.deepcopy(run("s1").messages["Organization-saad-tilleuls"])


def test_signed_message_verifies_and_stays_valid_r4(signer: Signer) -> None:
    sealed = sign(_message(), signer, "2026-10-30T11:30:00+01:00")
    Bundle.model_validate(sealed)
    assert verify(sealed, [signer.key]) == signer.kid


def test_any_change_breaks_the_seal(signer: Signer) -> None:
    sealed = sign(_message(), signer, "2026-10-30T11:30:00+01:00")
    altered = copy.deepcopy(sealed)
    altered["entry"][2]["resource"]["birthDate"] = "1900-01-01"
    with pytest.raises(SealError, match="altered"):
        verify(altered, [signer.key])
    reordered = copy.deepcopy(sealed)
    reordered["entry"].reverse()
    with pytest.raises(SealError):
        verify(reordered, [signer.key])


def test_missing_malformed_or_foreign_signatures_are_refused(signer: Signer) -> None:
    sealed = sign(_message(), signer, "2026-10-30T11:30:00+01:00")
    with pytest.raises(SealError, match="no JWS"):
        verify({k: v for k, v in sealed.items() if k != "signature"}, [signer.key])
    with pytest.raises(SealError, match="unknown key"):
        verify(sealed, [generate_key()])
    broken = copy.deepcopy(sealed)
    broken["signature"]["data"] = "not base64!"
    with pytest.raises(SealError, match="malformed"):
        verify(broken, [signer.key])


def test_the_same_content_signs_to_a_verifiable_seal_whatever_the_key_order(signer: Signer) -> None:
    message = _message()
    shuffled = {k: message[k] for k in reversed(list(message))}
    sealed = sign(message, signer, "2026-10-30T11:30:00+01:00")
    assert verify({**shuffled, "signature": sealed["signature"]}, [signer.key]) == signer.kid


def test_large_messages_verify(signer: Signer) -> None:
    """The GP's message carries the original letter (well over joserfc's compact-size limit)."""
    message = copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"])
    sealed = sign(message, signer, "2026-10-30T11:30:00+01:00")
    assert verify(sealed, [signer.key]) == signer.kid


def test_the_sent_bytes_are_the_signed_bundle_and_verify(signer: Signer) -> None:
    """What a transport sends (the canonical JSON with the signature spliced in) is the signed Bundle."""
    for message in (_message(), copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"])):
        sent = orjson.loads(sign_bytes(message, signer, "2026-10-30T11:30:00+01:00"))
        assert verify(sent, [signer.key]) == signer.kid
        Bundle.model_validate(sent)
        expected = sign(message, signer, "2026-10-30T11:30:00+01:00")
        assert {k: v for k, v in sent.items() if k != "signature"} == {
            k: v for k, v in expected.items() if k != "signature"
        }
        assert {**sent["signature"], "data": ""} == {**expected["signature"], "data": ""}  # ECDSA: data differs
    stale = {**_message(), "signature": {"data": "old"}}  # an earlier signature is replaced, never kept
    assert orjson.loads(sign_bytes(stale, signer, "2026-10-30T11:30:00+01:00"))["signature"]["data"] != "old"
    assert orjson.loads(sign_bytes({}, signer, "2026-10-30T11:30:00+01:00")).keys() == {"signature"}
