#!/bin/bash
# One device call: GPU tests, then the MoE sweep, then `grok1 bench` (decode + prefill).
# Logs and JSON go to $OUT (or /tmp/grok1_out). Usage: bash bench/run_device.sh [tests|moe|bench]...
set -o pipefail
OUT=${OUT:-/tmp/grok1_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH
steps=${*:-tests moe bench}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
for s in $steps; do
  case $s in
    tests) timeout 170 python3 -m pytest -q -m gpu tests/test_ops_moe.py tests/test_ops_attention.py \
             tests/test_ops_small.py tests/test_engine_llm.py tests/test_engine_golden.py 2>&1 \
             | tail -40 | tee "$OUT/tests.log" ;;
    moe) timeout 170 python3 bench/moe.py --tuned-out "$OUT/moe_tuned.json" 2>&1 | tee "$OUT/moe.log" ;;
    profile) timeout 60 python3 bench/profile_step.py 2>&1 | tee "$OUT/profile.log" ;;
    bench) [ -s "$OUT/moe_tuned.json" ] && cp "$OUT/moe_tuned.json" grok1/ops/configs/moe.json
           timeout 120 python3 bench/decode.py --out "$OUT" 2>&1 | tee "$OUT/decode.log"
           timeout 80 python3 bench/prefill.py --out "$OUT" 2>&1 | tee "$OUT/prefill.log" ;;
  esac
done
