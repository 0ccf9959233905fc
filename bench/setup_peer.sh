#!/usr/bin/env bash
# Install python-fhir-converter 0.3.0 in its own venv (its exact pins clash with ours).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${PEER_VENV:-$here/.venv-peer}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import fhir_converter" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "python-fhir-converter==0.3.0"
fi
echo "$venv"
