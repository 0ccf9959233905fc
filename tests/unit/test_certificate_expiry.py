"""``gateway_certificate_expiry_timestamp_seconds``: when each certificate the gateway presents expires."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, certificate_expiry
from tests import pki


def _expiries(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["certificate"]: s.value
        for family in text_string_to_metric_families(generate_latest(metrics.exposition()).decode())
        for s in family.samples
        if s.name == "gateway_certificate_expiry_timestamp_seconds"
    }


def test_each_configured_certificate_is_exported_by_name_and_the_leaf_of_a_chain_counts(tmp_path: Path) -> None:
    authority = pki.ca()
    leaf = pki.issue(authority, "localhost", server=True, not_after=pki.NOW + timedelta(days=7))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.cert_pem + authority.cert_pem)  # the CA lasts longer: the leaf decides
    (tmp_path / "junk.pem").write_text("not a certificate")
    metrics = Metrics()
    found = metrics.certificates(
        {
            "server": chain,
            "recipients-client": None,
            "mssante-client": tmp_path / "missing.pem",
            "smime-signing": tmp_path / "junk.pem",
        }
    )
    assert found == {"server": leaf.cert.not_valid_after_utc}
    assert _expiries(metrics) == {"server": leaf.cert.not_valid_after_utc.timestamp()}
    assert certificate_expiry(tmp_path / "junk.pem") is None


def test_no_certificate_configured_exports_no_series() -> None:
    metrics = Metrics()
    assert metrics.certificates({"server": None}) == {}
    assert _expiries(metrics) == {}
