#!/usr/bin/env bash
# Create .venv with tuneforge and its test dependencies. Idempotent; safe to re-run.
# TORCH_SPEC picks the torch build (default: torch==2.13.0, a CPU build on our machines;
# on a CUDA machine use e.g. TORCH_SPEC="torch==2.11.0" or keep the torch you have).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first: when a dependency pulls plain `torch`, pip would take a multi-GB CUDA build.
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
echo "tuneforge installed in .venv (activate with: . .venv/bin/activate)"
