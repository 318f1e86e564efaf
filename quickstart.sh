#!/usr/bin/env bash
# One command for a fresh machine: set up .venv, then train the tiny shipped example on the CPU
# (a from-scratch model learns a toy task in about a minute and reports held-out accuracy; on a busy
# machine tuneforge uses only the free cores: set OMP_NUM_THREADS to choose).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/tuneforge train examples/sft-tiny.yaml "$@"
