#!/usr/bin/env bash
# What we run on the lent GPU (H100 or H200; see docs/benchmarks.md): install the wheels the image lacks
# (carried in .whl/, made by bench/device_wheels.sh), then the steps named in STEPS, each under its own time
# limit, results and logs in $OUT.
#
#   STEPS="tests rollout train-full train-lora pref-full" bash bench/h200_session.sh
#
# tests: the CUDA tests (TESTS overrides the list); rollout: bench/rollout_throughput.py (ROLLOUT_ARGS);
# train-MODE: bench/train_throughput.py --mode MODE (TRAIN_ARGS, e.g. --compile --engines tuneforge);
# pref-MODE: bench/preference_packing.py --mode MODE (PREF_ARGS); grpo-MODE: bench/grpo_step.py --mode MODE
# (GRPO_ARGS); attn: bench/decode_attention.py (kernel launch configurations); gemm: bench/decode_gemm.py (the
# decode step's GEMMs, GEMM_ARGS); gputests: every test marked gpu; preset-NAME: bench/train_throughput.py
# --preset NAME (PRESET_ARGS); mw: bench/master_weights_curve.py (MW_ARGS); first: bench/first_step.py
# (FIRST_ARGS); ebft: bench/ebft_strided.py --cpu-check. STEP_TIMEOUT bounds each step (s).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.whl/bnbsite:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import datasets" 2>/dev/null && ls .whl/alt/*.whl >/dev/null 2>&1; then
  # The image's pyarrow is older than the newest datasets needs: the older datasets set in .whl/alt.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
DEFAULT_TESTS="tests/test_decode_kernel.py tests/test_fused_decode.py tests/test_gpu_paths.py tests/test_packed_attention.py tests/test_models_losses.py tests/test_rollout_embedded.py tests/test_engine_accum.py"
quiet() { grep -v -E "it/s\]|Warning|warn" | tail -${TAIL:-20}; }
for step in ${STEPS:-tests train-full train-lora}; do
  echo "=== $step ($(date +%T))"
  case $step in
    tests) timeout -k 15 ${STEP_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -rfEs --show-capture=no \
             ${TESTS:-$DEFAULT_TESTS} > "$OUT/tests.txt" 2>&1; tail -25 "$OUT/tests.txt" ;;
    rollout) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/rollout_throughput.py --out "$OUT/rollout.jsonl" ${ROLLOUT_ARGS:-} 2>&1 | quiet ;;
    train-*) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/train_throughput.py --mode "${step#train-}" \
               --out "$OUT/train_${step#train-}.jsonl" ${TRAIN_ARGS:-} 2>&1 | quiet ;;
    pref-*) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/preference_packing.py --mode "${step#pref-}" \
              --out "$OUT/pref_${step#pref-}.jsonl" ${PREF_ARGS:-} 2>&1 | quiet ;;
    grpo-*) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/grpo_step.py --mode "${step#grpo-}" \
              --out "$OUT/grpo_${step#grpo-}.jsonl" ${GRPO_ARGS:-} 2>&1 | quiet ;;
    attn) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/decode_attention.py --out "$OUT/attn.jsonl" ${ATTN_ARGS:-} > "$OUT/attn.txt" 2>&1
          python3 -c "import json,sys; rs=[json.loads(l) for l in open(sys.argv[1]) if 'error' not in l]
for r in sorted(rs, key=lambda r: (r['shape'], r['us']))[:60]: print(r['shape'], r['config'], r['us'], r['tb_per_s'])" "$OUT/attn.jsonl" ;;
    gemm) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/decode_gemm.py --out "$OUT/gemm.jsonl" ${GEMM_ARGS:-} 2>&1 | TAIL=40 quiet ;;
    gputests) timeout -k 15 ${STEP_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -rfEs -m gpu tests \
                > "$OUT/gputests.txt" 2>&1; tail -25 "$OUT/gputests.txt" ;;
    preset-*) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/train_throughput.py --preset "${step#preset-}" \
                --out "$OUT/${step}.jsonl" ${PRESET_ARGS:-} 2>&1 | TAIL=12 quiet ;;
    mw) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/master_weights_curve.py --out "$OUT/mw.json" \
          --plot "$OUT/mw.png" ${MW_ARGS:-} 2>&1 | quiet ;;
    first) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/first_step.py --out "$OUT/first.json" ${FIRST_ARGS:-} 2>&1 | quiet ;;
    ebft) timeout -k 15 ${STEP_TIMEOUT:-240} python3 bench/ebft_strided.py --cpu-check ${EBFT_ARGS:-} 2>&1 | quiet ;;
    *) echo "unknown step $step" ;;
  esac
done
