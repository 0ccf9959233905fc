"""The deployment files (no Docker engine here): what can be checked without running the containers is."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle

from gateway.seal import load_key
from gateway.settings import Settings, SettingsError, env_names, refuse_demo_secrets

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yml").read_text(encoding="utf-8"))
    return loaded


def test_image_is_slim_non_root_and_checks_its_health() -> None:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages and all(s.startswith("python:3.11-slim") for s in stages)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert "-c constraints.txt" in text  # the tested versions, not whatever PyPI has today
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in copied.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_compose_has_the_whole_chain() -> None:
    services = compose()["services"]
    assert {"gateway", "postgres", "receiver-care", "receiver-social", "smtp-sink"} <= set(services)
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name, secret in compose()["secrets"].items():
        assert (DOCKER / secret["file"]).is_file(), f"secret {name} file missing"


def _gateway_environment() -> dict[str, str]:
    """The gateway container's environment, with /run/secrets/<name> mapped to the files compose mounts."""
    doc = compose()
    files = {f"/run/secrets/{name}": str(DOCKER / s["file"]) for name, s in doc["secrets"].items()}
    env = {k: str(v) for k, v in doc["services"]["gateway"]["environment"].items()}
    return {k: files.get(v, v) for k, v in env.items()}


def test_compose_configuration_is_valid_and_demo_only() -> None:
    env = _gateway_environment()
    known = {name for name, _ in env_names()} | {
        "GATEWAY_SMTP_HOST",
        "GATEWAY_SMTP_PORT",
        "GATEWAY_SMTP_SENDER",
        "GATEWAY_SMTP_REQUIRE_STARTTLS",
    }
    unknown = [k for k in env if k not in known and k.removesuffix("_FILE") not in known]
    assert not unknown, f"compose sets variables the gateway does not read: {unknown}"
    settings = Settings.from_env(env)
    assert settings.mode == "demo" and settings.database_url.startswith("postgresql://gateway:")
    assert settings.api_keys and settings.mllp_port == 2575
    key = load_key(Path(env["GATEWAY_SIGNING_KEY_FILE"]).read_bytes())
    refuse_demo_secrets(settings, key.thumbprint())  # demo mode: allowed
    production = Settings.from_env({**env, "GATEWAY_MODE": "production"})
    with pytest.raises(SettingsError, match="published demo key"):
        refuse_demo_secrets(production, key.thumbprint())


def test_demo_directory_points_at_the_compose_services() -> None:
    raw = (DOCKER / "demo" / "directory.json").read_bytes()
    Bundle.model_validate_json(raw)
    services = set(compose()["services"])
    addresses = [
        e["resource"]["address"] for e in orjson.loads(raw)["entry"] if e["resource"]["resourceType"] == "Endpoint"
    ]
    assert addresses
    for address in addresses:
        if address.startswith("http"):
            assert address.split("/")[2].split(":")[0] in services, address
        else:
            assert address.startswith("mailto:")  # through the SMTP sink
    Bundle.model_validate_json((DOCKER / "demo" / "consents.json").read_bytes())
