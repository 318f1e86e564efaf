#!/usr/bin/env bash
# DeepSpeed ZeRO-3 beside FSDP2 on one GPU (issue #15's GPU line; record the result in docs/benchmarks.md and the
# table in docs/multi-gpu.md): the same 1B full fine-tune (bench/train_throughput.py, Llama-3.2-1B shape,
# random weights, packed rows, bf16, micro-batch 1 x 4096 tokens), tokens/s and peak GPU memory per engine.
#
# The device has no internet: carry the wheels (run with carry [".whl"]). .whl/*.whl are the ones
# bench/h200_session.sh installs; .whl/deepspeed/ holds DeepSpeed 0.19.8 (built with DS_BUILD_OPS=0: pure
# Python, ops compiled on first use where needed) and the pure-Python dependencies the image lacks.
#
#   bash bench/deepspeed_gpu.sh                    # FSDP2, then ZeRO-3, 30 steps each
#   STEPS=20 OFFLOAD=1 bash bench/deepspeed_gpu.sh # both with parameter/optimizer offload to host memory
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/deepspeed/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import datasets" 2>/dev/null && ls .whl/alt/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 \
  | tail -1 | tee -a "$OUT/gpu.txt"
# The quick DeepSpeed tests (auto values, scaling, refusal) on this image; the 2-process ones need 2 devices.
timeout -k 15 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_deepspeed.py > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
ARGS="--mode full --shape llama-1b --seq-len ${SEQ_LEN:-4096} --steps ${STEPS:-30}"
[ -n "${OFFLOAD:-}" ] && ARGS="$ARGS --offload"
for engine in tuneforge-fsdp tuneforge-deepspeed; do
  echo "=== $engine ($(date +%T))"
  # One process each (a fresh CUDA context, so the peak memory is this engine's alone).
  timeout -k 15 ${STEP_TIMEOUT:-420} python3 bench/train_throughput.py $ARGS --engines $engine \
    --out "$OUT/$engine.jsonl" > "$OUT/$engine.log" 2>&1
  echo "rc=$?"; grep -E '^\{' "$OUT/$engine.log" || tail -20 "$OUT/$engine.log"
done
