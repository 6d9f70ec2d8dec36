#!/usr/bin/env bash
# Sets up a virtual environment (if absent) and runs the test suite. This is the README's
# test command; CI (.ci/run) calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Two pytest workers (pytest-xdist), each taking whole files (module fixtures train once):
# most of a test's time is compiling on one core. PROSONA_TEST_WORKERS=0 runs serially.
WORKERS=${PROSONA_TEST_WORKERS:-2}
if [[ "$WORKERS" == 0 ]]; then
  python -m pytest -q tests "$@"
else
  python -m pytest -q -n "$WORKERS" --dist loadfile tests "$@"
fi
