"""The cheaper receiver checks all it checked: ``seal.verify`` without ``jws.deserialize_compact`` refuses
what joserfc refused (and RFC 7797 headers too), agrees with joserfc both ways, and the receiver's
statement built once still stores each message once, byte for byte, with the answer a resend gets."""

from __future__ import annotations

import base64
import copy
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey
from joserfc.util import json_b64encode, urlsafe_b64encode
from sqlalchemy import create_engine, text

from gateway import seal
from gateway.receiver import create_receiver
from gateway.seal import SealError, Signer, canonical, generate_key, sign, verify
from tests.dispatch_cases import run

SIGNER = Signer(generate_key())
OTHER = Signer(generate_key())
WHEN = "2026-10-30T11:30:00+01:00"


@pytest.fixture(scope="module")
def sealed() -> dict[str, Any]:
    return sign(copy.deepcopy(run("s1").messages["Organization-saad-tilleuls"]), SIGNER, WHEN)


@pytest.fixture(scope="module")
def large() -> dict[str, Any]:
    """The GP's message: it carries the original letter (over joserfc's 128 kB compact payload limit)."""
    return sign(copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"]), SIGNER, WHEN)


def _unsigned(bundle: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in bundle.items() if k != "signature"}


def _parts(bundle: dict[str, Any]) -> tuple[str, str, str]:
    head, payload, sig = base64.b64decode(bundle["signature"]["data"]).decode().split(".")
    return head, payload, sig


def _with_jws(bundle: dict[str, Any], value: str | bytes) -> dict[str, Any]:
    raw = value.encode() if isinstance(value, str) else value
    return {**bundle, "signature": {**bundle["signature"], "data": base64.b64encode(raw).decode()}}


def _joserfc_sealed(bundle: dict[str, Any], header: dict[str, Any], key: Any, alg: str) -> dict[str, Any]:
    """``bundle`` carrying a detached JWS that joserfc itself made over the canonical unsigned Bundle."""
    value = jws.serialize_compact(header, canonical(_unsigned(bundle)), key, algorithms=[alg])
    head, _, sig = value.split(".")
    return _with_jws(bundle, f"{head}..{sig}")


def _reference(bundle: dict[str, Any], keys: list[ECKey]) -> bool:
    """What ``verify`` did before: joserfc's ``deserialize_compact`` on the detached form (where a header
    ``crit`` that is not a list made joserfc raise TypeError, a 500 in the receiver)."""
    try:
        head, empty, sig = base64.b64decode(bundle["signature"]["data"], validate=True).decode("ascii").split(".")
        if empty:
            return False
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        key = {str(k.kid): k for k in keys}[str(header.get("kid"))]
        payload = canonical(_unsigned(bundle))
        jws.deserialize_compact(f"{head}..{sig}", key, algorithms=["ES256"], payload=payload)
    except (ValueError, TypeError, KeyError, AttributeError, orjson.JSONDecodeError, JoseError):
        return False
    return True


def _accepts(bundle: dict[str, Any], keys: list[ECKey]) -> bool:
    try:
        verify(bundle, keys)
    except SealError:
        return False
    return True


# -- accepted, both ways with joserfc ---------------------------------------------------------------


def test_accepts_what_seal_sign_makes_and_joserfc_accepts_it_too(sealed: dict[str, Any], large: dict[str, Any]) -> None:
    for bundle in (sealed, large):
        assert verify(bundle, [OTHER.key, SIGNER.key]) == SIGNER.kid
        head, _, sig = _parts(bundle)
        payload = canonical(_unsigned(bundle))
        jws.deserialize_compact(f"{head}..{sig}", SIGNER.key, algorithms=["ES256"], payload=payload)


def test_accepts_a_detached_jws_made_by_joserfc_serialize_compact(
    sealed: dict[str, Any], large: dict[str, Any]
) -> None:
    for bundle in (sealed, large):
        for header in ({"alg": "ES256", "kid": SIGNER.kid}, {"alg": "ES256", "kid": SIGNER.kid, "typ": "JOSE"}):
            made = _joserfc_sealed(bundle, header, SIGNER.key, "ES256")
            assert verify(made, [SIGNER.key]) == SIGNER.kid
            assert _reference(made, [SIGNER.key])


def test_a_public_key_alone_verifies(sealed: dict[str, Any]) -> None:
    public = ECKey.import_key(SIGNER.key.as_dict(private=False))
    public.ensure_kid()
    assert verify(sealed, [public]) == SIGNER.kid


# -- refused -------------------------------------------------------------------------------------------


def test_refuses_an_altered_payload(sealed: dict[str, Any]) -> None:
    altered = copy.deepcopy(sealed)
    altered["entry"][0]["resource"]["id"] = "another-message"
    with pytest.raises(SealError, match="altered"):
        verify(altered, [SIGNER.key])
    added = {**sealed, "language": "fr-FR"}
    with pytest.raises(SealError, match="altered"):
        verify(added, [SIGNER.key])


def test_refuses_an_altered_header(sealed: dict[str, Any]) -> None:
    _, _, sig = _parts(sealed)
    for header in (
        {"alg": "ES256", "kid": SIGNER.kid, "typ": "application/json"},
        {"alg": "ES256", "kid": SIGNER.kid},
        {"kid": SIGNER.kid, "alg": "ES256", "typ": "application/fhir+json"},  # same content, other bytes
    ):
        with pytest.raises(SealError, match="altered"):
            verify(_with_jws(sealed, f"{json_b64encode(header).decode()}..{sig}"), [SIGNER.key])


def test_refuses_a_wrong_or_unknown_kid(sealed: dict[str, Any]) -> None:
    _, _, sig = _parts(sealed)
    wrong = json_b64encode({"alg": "ES256", "kid": OTHER.kid, "typ": "application/fhir+json"}).decode()
    with pytest.raises(SealError, match="altered"):  # a trusted key, but not the one that signed
        verify(_with_jws(sealed, f"{wrong}..{sig}"), [SIGNER.key, OTHER.key])
    with pytest.raises(SealError, match="unknown key"):
        verify(sealed, [OTHER.key])
    with pytest.raises(SealError, match="unknown key"):
        verify(sealed, [])
    kidless = json_b64encode({"alg": "ES256"}).decode()
    with pytest.raises(SealError, match="unknown key"):
        verify(_with_jws(sealed, f"{kidless}..{sig}"), [SIGNER.key])


def test_refuses_other_algorithms(sealed: dict[str, Any]) -> None:
    none = json_b64encode({"alg": "none", "kid": SIGNER.kid}).decode()
    with pytest.raises(SealError, match="ES256"):
        verify(_with_jws(sealed, f"{none}.."), [SIGNER.key])
    # HS256 keyed with the public key (algorithm confusion), ES384 with a P-384 key under the trusted kid
    x = base64.urlsafe_b64decode(str(SIGNER.key.as_dict(private=False)["x"]) + "=")  # a public value as secret
    hmac = _joserfc_sealed(sealed, {"alg": "HS256", "kid": SIGNER.kid}, OctKey.import_key(x), "HS256")
    p384 = ECKey.generate_key("P-384")
    es384 = _joserfc_sealed(sealed, {"alg": "ES384", "kid": SIGNER.kid}, p384, "ES384")
    for bundle in (hmac, es384):
        with pytest.raises(SealError, match="ES256"):
            verify(bundle, [SIGNER.key])
        assert not _reference(bundle, [SIGNER.key])
    # an ES256 signature under a header saying something else
    _, _, sig = _parts(sealed)
    for alg in ("ES384", "HS256", "RS256", "EdDSA", None, 256):
        forged = json_b64encode({"alg": alg, "kid": SIGNER.kid, "typ": "application/fhir+json"}).decode()
        with pytest.raises(SealError):
            verify(_with_jws(sealed, f"{forged}..{sig}"), [SIGNER.key])


def test_refuses_b64_crit_and_unregistered_header_parameters(sealed: dict[str, Any]) -> None:
    """RFC 7797 (``b64: false``) signs the raw payload: joserfc accepted it, the seal never uses it."""
    unencoded = _joserfc_sealed(
        sealed, {"alg": "ES256", "kid": SIGNER.kid, "b64": False, "crit": ["b64"]}, SIGNER.key, "ES256"
    )
    assert _reference(unencoded, [SIGNER.key])  # the old check let it through
    with pytest.raises(SealError, match="b64/crit"):
        verify(unencoded, [SIGNER.key])
    encoded = _joserfc_sealed(sealed, {"alg": "ES256", "kid": SIGNER.kid, "b64": True}, SIGNER.key, "ES256")
    with pytest.raises(SealError, match="b64/crit"):
        verify(encoded, [SIGNER.key])
    _, _, sig = _parts(sealed)
    for header in (
        {"alg": "ES256", "kid": SIGNER.kid, "crit": ["exp"], "exp": 1},
        {"alg": "ES256", "kid": SIGNER.kid, "x-extra": "1"},
        {"alg": "ES256", "kid": SIGNER.kid, "typ": 1},
    ):
        with pytest.raises(SealError):
            verify(_with_jws(sealed, f"{json_b64encode(header).decode()}..{sig}"), [SIGNER.key])
    # joserfc's own header check refuses an unregistered parameter even when correctly signed
    signed = jws.sign_compact(  # sign_compact skips the registry's checks: a sender that does not care
        jws.CompactSignature({"alg": "ES256", "kid": SIGNER.kid, "x-extra": "1"}, canonical(_unsigned(sealed))),
        seal._ES256,
        SIGNER.key,
    ).decode()
    h, _, s = signed.split(".")
    extra = _with_jws(sealed, f"{h}..{s}")
    assert not _reference(extra, [SIGNER.key])
    with pytest.raises(SealError):
        verify(extra, [SIGNER.key])


def test_refuses_an_attached_jws(sealed: dict[str, Any]) -> None:
    attached = jws.serialize_compact(
        {"alg": "ES256", "kid": SIGNER.kid, "typ": "application/fhir+json"},
        canonical(_unsigned(sealed)),
        SIGNER.key,
        algorithms=["ES256"],
    )
    with pytest.raises(SealError, match="not detached"):
        verify(_with_jws(sealed, attached), [SIGNER.key])


def test_refuses_truncated_garbage_or_wrong_length_signatures(sealed: dict[str, Any]) -> None:
    head, _, sig = _parts(sealed)
    raw = base64.urlsafe_b64decode(sig + "==")
    assert len(raw) == 64
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    for bad in (
        "",
        sig[:-1],
        sig[:43],
        sig + "A",
        "A" * len(sig),
        urlsafe_b64encode(raw[:63]).decode(),
        urlsafe_b64encode(raw + b"\0").decode(),
        urlsafe_b64encode(b"\0" + raw).decode(),
        urlsafe_b64encode(raw[32:] + raw[:32]).decode(),
        urlsafe_b64encode(der).decode(),  # the right signature, DER-encoded
        urlsafe_b64encode(bytes(64)).decode(),
        "x" * 2000,
    ):
        with pytest.raises(SealError):
            verify(_with_jws(sealed, f"{head}..{bad}"), [SIGNER.key])


def test_refuses_bad_base64_anywhere(sealed: dict[str, Any]) -> None:
    head, _, sig = _parts(sealed)
    detached = f"{head}..{sig}"
    for data in ("not base64!", base64.b64encode(detached.encode()).decode()[:-1], "é", 12):
        with pytest.raises(SealError, match="malformed"):
            verify({**sealed, "signature": {**sealed["signature"], "data": data}}, [SIGNER.key])
    for bad in (
        f"{head}=..{sig}",  # padding
        f"{head.replace('J', '+')}..{sig}",  # the standard alphabet
        f"{head}..{sig}=",
        f"{head}..{sig[:-2]}+/",
        f"{head}..{sig[:-1]}B",  # non-canonical last character (bits set past the data)
        f"{head}.{sig}",  # two segments
        f"{head}...{sig}",  # four segments
        f"{head}..{sig}\n",
        "..",
        f"{head[:-1]}..{sig}",  # cut header
    ):
        with pytest.raises(SealError):
            verify(_with_jws(sealed, bad), [SIGNER.key])
        assert not _reference(_with_jws(sealed, bad), [SIGNER.key])


def test_refuses_a_header_that_is_not_a_json_object(sealed: dict[str, Any]) -> None:
    _, _, sig = _parts(sealed)
    for header in (b'"alg kid"', b"[1]", b"null", b"{", b"\xff\xfe", b'{"alg": "ES256", "kid": "' + b"k" * 600 + b'"}'):
        with pytest.raises(SealError, match="header"):
            verify(_with_jws(sealed, f"{urlsafe_b64encode(header).decode()}..{sig}"), [SIGNER.key])


def test_refuses_a_missing_or_other_signature_format(sealed: dict[str, Any]) -> None:
    for signature in (None, "x", {}, {**sealed["signature"], "sigFormat": "application/pkcs7-signature"}):
        with pytest.raises(SealError, match="no JWS"):
            verify({**sealed, "signature": signature}, [SIGNER.key])


def test_refuses_a_trusted_key_not_meant_for_es256_signatures(sealed: dict[str, Any]) -> None:
    for extra in ({"use": "enc"}, {"alg": "ES384"}, {"key_ops": ["encrypt"]}):
        limited = ECKey.import_key({**SIGNER.key.as_dict(private=False), **extra})
        limited.ensure_kid()
        assert limited.kid == SIGNER.kid
        with pytest.raises(SealError):
            verify(sealed, [limited])
        assert not _reference(sealed, [limited])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_agrees_with_joserfc_on_any_change_of_the_signature_bytes(sealed: dict[str, Any], data: st.DataObject) -> None:
    detached = bytearray(base64.b64decode(sealed["signature"]["data"]))
    position = data.draw(st.integers(0, len(detached) - 1))
    detached[position] = data.draw(
        st.sampled_from(b"ABCDEFQRSTUVWXYZabcdwxyz0123456789-_.=+/ ").filter(lambda c: c != detached[position])
    )
    changed = _with_jws(sealed, bytes(detached))
    assert _accepts(changed, [SIGNER.key]) == _reference(changed, [SIGNER.key])


_HEADER_VALUES = st.one_of(
    st.text(max_size=5), st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2)
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["typ", "cty", "x5t", "x5c", "x5u", "jku", "crit", "b64", "zip", "x-extra"]),
        _HEADER_VALUES,
        max_size=3,
    )
)
def test_agrees_with_joserfc_on_correctly_signed_headers(sealed: dict[str, Any], extra: dict[str, Any]) -> None:
    """Whatever a signer puts in the header, verify accepts it iff joserfc did, except RFC 7797's b64/crit."""
    header = {"alg": "ES256", "kid": SIGNER.kid, **extra}
    signed = jws.sign_compact(jws.CompactSignature(header, canonical(_unsigned(sealed))), seal._ES256, SIGNER.key)
    h, _, s = signed.decode().split(".")
    bundle = _with_jws(sealed, f"{h}..{s}")
    expected = _reference(bundle, [SIGNER.key]) and "b64" not in header and "crit" not in header
    assert _accepts(bundle, [SIGNER.key]) == expected


# -- the receiver ------------------------------------------------------------------------------------


def _rx(tmp_path: Path) -> TestClient:
    return TestClient(create_receiver(f"sqlite:///{tmp_path / 'rx.db'}", [SIGNER.key], endpoint="https://rx.test/fhir"))


def _rows(tmp_path: Path) -> list[Any]:
    engine = create_engine(f"sqlite:///{tmp_path / 'rx.db'}")
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(text("SELECT message_id, bundle_id, received_at, response, body FROM received_message"))
            )
    finally:
        engine.dispose()


def test_stores_the_body_as_received_and_the_answer_a_resend_gets(tmp_path: Path, sealed: dict[str, Any]) -> None:
    body = b'  {"signature": ' + orjson.dumps(sealed["signature"]) + b", " + orjson.dumps(_unsigned(sealed))[1:] + b"\n"
    with _rx(tmp_path) as client:
        first = client.post(
            "/fhir/gp/$process-message", content=body, headers={"Content-Type": "application/fhir+json"}
        )
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("application/fhir+json")
        again = client.post("/$process-message", json=sealed)
        assert again.status_code == 200
        assert again.content == first.content
        listed = client.get("/messages").json()
    answer = first.json()
    request_header = sealed["entry"][0]["resource"]
    header = answer["entry"][0]["resource"]
    assert answer["resourceType"] == "Bundle" and answer["type"] == "message"
    assert answer["id"] != header["id"] and answer["entry"][0]["fullUrl"] == f"urn:uuid:{header['id']}"
    assert len(answer["timestamp"]) == len("2026-10-30T10:30:00+00:00") and answer["timestamp"].endswith("+00:00")
    assert header["response"] == {"identifier": request_header["id"], "code": "ok"}
    assert header["eventCoding"] == request_header["eventCoding"]
    assert header["source"] == {"name": "reference-receiver", "endpoint": "https://rx.test/fhir"}
    [row] = _rows(tmp_path)
    assert row.message_id == request_header["id"] and row.bundle_id == sealed["id"]
    assert row.body.encode() == body  # byte for byte, not re-serialised
    assert row.response.encode() == first.content
    assert listed == [{"messageHeader": request_header["id"], "received": listed[0]["received"]}]
    assert listed[0]["received"][:10] == answer["timestamp"][:10]


def test_concurrent_resends_to_receivers_sharing_a_database_store_one_message(
    tmp_path: Path, sealed: dict[str, Any]
) -> None:
    clients = [_rx(tmp_path) for _ in range(4)]
    for client in clients:
        client.__enter__()
    try:
        start = threading.Barrier(len(clients) * 2)
        answers: list[tuple[int, bytes]] = []
        lock = threading.Lock()

        def post(client: TestClient) -> None:
            start.wait()
            answer = client.post("/$process-message", json=sealed)
            with lock:
                answers.append((answer.status_code, answer.content))

        threads = [threading.Thread(target=post, args=(c,)) for c in clients * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for client in clients:
            client.__exit__(None, None, None)
    assert len(answers) == 8
    assert {status for status, _ in answers} == {200}
    assert len({content for _, content in answers}) == 1  # every sender got the first answer
    assert len(_rows(tmp_path)) == 1


def test_the_receiver_refuses_what_verify_refuses(tmp_path: Path, sealed: dict[str, Any]) -> None:
    none = json_b64encode({"alg": "none", "kid": SIGNER.kid}).decode()
    unencoded = _joserfc_sealed(
        sealed, {"alg": "ES256", "kid": SIGNER.kid, "b64": False, "crit": ["b64"]}, SIGNER.key, "ES256"
    )
    altered = copy.deepcopy(sealed)
    altered["entry"][0]["resource"]["eventCoding"]["code"] = "other"
    with _rx(tmp_path) as client:
        for bundle in (_with_jws(sealed, f"{none}.."), unencoded, altered):
            answer = client.post("/$process-message", json=bundle)
            assert answer.status_code == 400
            assert answer.json()["issue"][0]["code"] == "security"
        assert client.get("/messages").json() == []
