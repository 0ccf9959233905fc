"""The real `gateway serve` process configured only by its environment, as a container runs it.

Keys from `gateway keys generate|rotate`, the directory from `gateway directory import`, secrets from
``*_FILE`` variables, the MLLP listener from ``GATEWAY_MLLP_PORT``; then: ready, a letter over MLLP
acknowledged AA and visible over HTTP, counted in /metrics, both keys published, and every log line
JSON without the patient's data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FIXTURES
from tests.hl7v2_messages import mdm, send_all

GATEWAY = str(Path(sys.executable).with_name("gateway"))
HIS, ADMIN = "his-key-0123456789abcdef", "admin-key-0123456789abcdef"
# the S1 patient (see tests/hl7v2_messages.py): identifiers, names, birth date
PATIENT_DATA = ("244037511305285", "IPP0004527891", "MARTIN", "DUPONT", "19440305", "1944-03-05")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_serve_from_its_environment(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    (tmp_path / "api-keys").write_text(f"{HIS}:his\n{ADMIN}:admin+auditor\n", encoding="utf-8")
    (tmp_path / "database-url").write_text(f"sqlite:///{tmp_path / 'gw.db'}\n", encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_DATABASE_URL_FILE": str(tmp_path / "database-url"),
        "GATEWAY_API_KEYS_FILE": str(tmp_path / "api-keys"),
        "GATEWAY_SIGNING_KEY_FILE": str(keys_dir / "signing-key.jwk"),
        "GATEWAY_TRUSTED_KEYS_FILE": str(keys_dir / "keys.jwks"),
        "GATEWAY_MLLP_PORT": str(mllp_port := _free_port()),
        "GATEWAY_MLLP_SENDERS": "CHU-PARIS",
        "GATEWAY_LOG_FORMAT": "json",
    }
    assert _run("keys", "generate", "--out", str(keys_dir), env=env).returncode == 0
    assert _run("keys", "rotate", "--dir", str(keys_dir), env=env).returncode == 0
    imported = _run("directory", "import", str(FIXTURES / "dispatch" / "directory.json"), env=env)
    assert imported.returncode == 0, imported.stderr
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([GATEWAY, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(300):
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            ready = client.get("/readyz").json()
            assert ready["status"] == "ready", ready

            [ack] = send_all(mllp_port, [mdm(control="SERVE-1")])
            msa = next(s for s in ack.decode().split("\r") if s.startswith("MSA"))
            assert msa.split("|")[1:3] == ["AA", "SERVE-1"], ack
            text = msa.split("|")[3]  # "letter <id> stored"
            assert text.startswith("letter ") and text.endswith(" stored"), msa
            letter_id = text.split()[1]
            status = client.get(f"/letters/{letter_id}", headers={"X-API-Key": ADMIN})
            assert status.status_code == 200 and status.json()["deliveries"], status.text

            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for s in family.samples
            }
            assert samples[("gateway_letters_accepted_total", (("source", "mllp"),))] == 1.0

            jwks = client.get("/.well-known/jwks.json").json()
            keyring = json.loads((keys_dir / "keys.jwks").read_text())
            assert [k["kid"] for k in jwks["keys"]] == [k["kid"] for k in keyring["keys"]]
            assert len(jwks["keys"]) == 2 and all("d" not in k for k in jwks["keys"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    lines = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert {"timestamp", "level", "event"} <= set(record), line
    text = "\n".join(lines)
    assert [p for p in PATIENT_DATA if p in text] == []
    assert any(json.loads(line).get("letter_id") for line in lines), "the accepted letter is logged by its id"
