"""Settings: the environment, secrets from files, refusals that name the variable, and the demo-secret guard."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from gateway.seal import generate_key, load_key
from gateway.settings import (
    DEMO_API_KEY_DIGESTS,
    DEMO_KEY_THUMBPRINTS,
    Settings,
    SettingsError,
    env_names,
    loopback,
    refuse_demo_secrets,
)

ROOT = Path(__file__).resolve().parents[2]
HIS = "h" * 20
FP = "ab" * 32


def test_environment_is_read_typed() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_API_KEYS": f"{HIS}:his+auditor",
            "GATEWAY_AUTH": "both",
            "GATEWAY_CLIENT_CERTS": f"{FP.upper()}:his",
            "GATEWAY_DELIVERY_THREADS": "2",
            "GATEWAY_STRICT_VALIDATION": "yes",
            "GATEWAY_MLLP_PORT": "2575",
            "GATEWAY_MLLP_SENDERS": "CHU_NANTES, CLINIQUE_X",
            "GATEWAY_LOG_LEVEL": "debug",
            "OTHER_VARIABLE": "ignored",
        }
    )
    assert settings.api_keys == {HIS: frozenset({"his", "auditor"})}
    assert settings.auth_mode == "both"
    assert settings.client_certs == {FP: frozenset({"his"})}
    assert settings.delivery_threads == 2 and settings.strict_validation is True
    assert settings.mllp_port == 2575 and settings.mllp_senders == frozenset({"CHU_NANTES", "CLINIQUE_X"})
    assert settings.log_level == "DEBUG" and settings.mode == "production"


def test_construction_in_code_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("GATEWAY_DELIVERY_THREADS", "9")
    assert Settings().database_url == "sqlite:///gateway.db" and Settings().delivery_threads == 4
    assert Settings.from_env().database_url == "sqlite:///elsewhere.db"


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"# HIS of the CHU\n{HIS}:his\n", encoding="utf-8")
    (tmp_path / "db").write_text("postgresql://gw:s3cret@db:5432/gateway\n", encoding="utf-8")
    settings = Settings.from_env(
        {"GATEWAY_API_KEYS_FILE": str(tmp_path / "keys"), "GATEWAY_DATABASE_URL_FILE": str(tmp_path / "db")}
    )
    assert settings.api_keys == {HIS: frozenset({"his"})}
    assert settings.database_url == "postgresql://gw:s3cret@db:5432/gateway"
    # a setting that is itself a path keeps its name: GATEWAY_SIGNING_KEY_FILE is not "the file of SIGNING_KEY"
    assert Settings.from_env({"GATEWAY_SIGNING_KEY_FILE": "/run/secrets/k"}).signing_key_file == Path("/run/secrets/k")
    with pytest.raises(SettingsError, match="GATEWAY_DATABASE_URL or GATEWAY_DATABASE_URL_FILE"):
        Settings.from_env({"GATEWAY_DATABASE_URL": "sqlite://", "GATEWAY_DATABASE_URL_FILE": str(tmp_path / "db")})
    with pytest.raises(SettingsError, match="GATEWAY_API_KEYS_FILE"):
        Settings.from_env({"GATEWAY_API_KEYS_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"GATEWAY_MAX_DOCUMENT_BYTES": "ten"}, "GATEWAY_MAX_DOCUMENT_BYTES"),
        ({"GATEWAY_MAX_DOCUMENT_BYTES": "0"}, "GATEWAY_MAX_DOCUMENT_BYTES"),
        ({"GATEWAY_DEFAULT_TIMEZONE": "Mars/Olympus"}, "GATEWAY_DEFAULT_TIMEZONE"),
        ({"GATEWAY_PUBLIC_URL": "ftp://x"}, "GATEWAY_PUBLIC_URL"),
        ({"GATEWAY_RETRY_MAX_SECONDS": "-1"}, "GATEWAY_RETRY_MAX_SECONDS"),
        ({"GATEWAY_MODE": "staging"}, "GATEWAY_MODE"),
        ({"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT"),
        ({"GATEWAY_MLLP_PORT": "70000"}, "GATEWAY_MLLP_PORT"),
        ({"GATEWAY_STRICT_VALIDATION": "perhaps"}, "GATEWAY_STRICT_VALIDATION"),
        ({"GATEWAY_API_KEYS": "short:his"}, "16 characters"),
        ({"GATEWAY_API_KEYS": f"{HIS}:root"}, "roles must be among"),
        ({"GATEWAY_CLIENT_CERTS": "abcd:his"}, "not a SHA-256"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(environ)


def test_published_demo_secrets_are_refused_outside_demo_mode() -> None:
    demo_key = load_key((ROOT / "docker/demo/gateway-signing.jwk").read_bytes())
    demo_api = [
        line.split(":")[0] for line in (ROOT / "docker/demo/api-keys").read_text().splitlines() if line[:1] != "#"
    ]
    # the guard knows exactly the published files (a regenerated demo secret must update the digests)
    assert demo_key.thumbprint() in DEMO_KEY_THUMBPRINTS
    assert {hashlib.sha256(k.encode()).hexdigest() for k in demo_api} == DEMO_API_KEY_DIGESTS
    production = Settings(api_keys={demo_api[0]: frozenset({"his"})})
    with pytest.raises(SettingsError, match="published demo key"):
        refuse_demo_secrets(production, generate_key().thumbprint())
    with pytest.raises(SettingsError, match="published demo key"):
        refuse_demo_secrets(Settings(api_keys={HIS: frozenset({"his"})}), demo_key.thumbprint())
    with pytest.raises(SettingsError, match="GATEWAY_SIGNING_KEY_FILE is required"):
        refuse_demo_secrets(Settings(api_keys={HIS: frozenset({"his"})}), None)
    refuse_demo_secrets(Settings(api_keys={HIS: frozenset({"his"})}), generate_key().thumbprint())
    refuse_demo_secrets(production.model_copy(update={"mode": "demo"}), demo_key.thumbprint())
    refuse_demo_secrets(Settings(mode="demo"), None)
    assert "d" not in json.loads((ROOT / "docker/demo/gateway-signing.pub.jwk").read_text())  # public half only


def test_serve_refuses_to_start_with_the_demo_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    environ = {
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
        "GATEWAY_SIGNING_KEY_FILE": str(ROOT / "docker/demo/gateway-signing.jwk"),
        "GATEWAY_API_KEYS": f"{HIS}:his",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ.items():
            patch.setenv(name, value)
        patch.delenv("GATEWAY_MODE", raising=False)
        assert main(["serve", "--port", "1"]) == 3
    assert "published demo key" in capsys.readouterr().err
    assert not (tmp_path / "gw.db").exists()  # refused before touching the database


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 5)]
    documented = set(re.findall(r"`(GATEWAY_[A-Z_]+)`", table))
    missing = [name for name, _ in env_names() if name not in documented]
    assert not missing, f"README configuration table lacks {missing}"


@pytest.mark.parametrize(
    ("host", "inside"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("gateway.chu.fr", False),
    ],
)
def test_loopback_says_whether_a_listener_is_out_of_the_network_s_reach(host: str, inside: bool) -> None:
    assert loopback(host) is inside


def test_serve_warns_when_the_api_listens_beyond_loopback_in_plain_http(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'gw.db'}"
    env["GATEWAY_MODE"] = "demo"  # a throw-away signing key, so that start-up gets as far as the processes
    gateway = str(Path(sys.executable).with_name("gateway"))
    # --processes 99 stops it right after the start-up checks: only what they say is looked at
    done = subprocess.run(
        [gateway, "serve", "--host", "0.0.0.0", "--processes", "99"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "--processes must be between 1 and 64" in done.stderr
    assert "the API listens beyond this machine over plain HTTP" in done.stderr
