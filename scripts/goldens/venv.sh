#!/usr/bin/env bash
# Creates the dev-only Python venv (target/py) for the golden generators and Python peers.
# Idempotent. torch from PyPI is the CUDA build; it runs fine on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-target/py}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r scripts/goldens/requirements.txt
echo "venv ready: $VENV/bin/python"
