#!/usr/bin/env bash
# Sets up a virtual environment (if absent) and runs the test suite. This is the README's
# test command; CI (.ci/run) calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
