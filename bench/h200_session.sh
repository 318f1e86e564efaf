#!/usr/bin/env bash
# What we run on the lent H200 (see docs/benchmarks.md): install the wheels the image lacks
# (carried in .whl/), check the CUDA paths with the GPU tests, then the training throughput bench.
# Usage (on the device): bash bench/h200_session.sh [bench args...]; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_packed_attention.py tests/test_models_losses.py tests/test_engine_accum.py tests/test_chat_masking.py tests/test_config.py} 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
for mode in ${MODES:-full lora}; do
  timeout ${BENCH_TIMEOUT:-200} python3 bench/train_throughput.py --mode "$mode" --out "$OUT/train_$mode.jsonl" "$@" 2>&1 \
    | grep -v -E "it/s|Warning|warn" | tail -20
done
