#!/usr/bin/env bash
# Same benchmarks, two revisions of tuneforge, one machine, one call (a refactor must not cost speed):
#
#   git archive REV src bench | (mkdir -p .cmp/before && tar -x -C .cmp/before)   # here; .cmp is carried
#   BEFORE=.cmp/before bash bench/compare_revisions.sh                       # on the GPU machine
#
# Runs the 1B full fine-tune (bench/train_throughput.py, tuneforge only) and the GRPO-shaped rollout
# (bench/rollout_throughput.py, embedded engine), each revision with its own src and bench scripts, alternating
# (before, after, before, after for the training run when ROUNDS=2), results in $OUT/compare.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
for round in $(seq 1 ${ROUNDS:-1}); do
  for rev in before after; do
    root=$PWD; [ "$rev" = before ] && root=$PWD/$BEFORE
    src=$root/src
    echo "=== $rev train (round $round, $(date +%T))"
    PYTHONPATH=/tmp/site:$src timeout -k 10 ${STEP_TIMEOUT:-200} python3 $root/bench/train_throughput.py --mode full \
      --engines tuneforge --steps ${TRAIN_STEPS:-15} --warmup 5 --rows ${ROWS:-4000} --out "$OUT/train_$rev.jsonl" \
      2>&1 | grep '^{' | sed "s/^{/{\"rev\": \"$rev\", /" | tee -a "$OUT/compare.jsonl"
    [ "$round" = 1 ] || continue
    echo "=== $rev rollout ($(date +%T))"
    PYTHONPATH=/tmp/site:$src timeout -k 10 ${STEP_TIMEOUT:-200} python3 $root/bench/rollout_throughput.py \
      --shapes llama-3.2-1b --generations 8 --engines embedded --repeats 2 --out "$OUT/rollout_$rev.jsonl" \
      2>&1 | grep '^{' | sed "s/^{/{\"rev\": \"$rev\", /" | tee -a "$OUT/compare.jsonl"
  done
done
