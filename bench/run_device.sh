#!/bin/bash
# One device call: GPU tests, then the MoE sweep, then bench/engine_bench.py (decode + prefill).
# Logs and JSON go to $OUT (or /tmp/grok1_out). Usage: bash bench/run_device.sh [STEP]...
# Steps: gate (every GPU test + the engine on the golden: bench/gate.py), opdiff (each engine op
# beside its twin: bench/op_diff.py), tests (kernel + engine GPU tests), gputests (every GPU test), moe (sweep; MOE_ARGS
# e.g. "--tokens 1 --widths 32768 8192"), linear (the attention GEMV sweep), bench,
# profile, parallel (bench/parallel_decode.py on every GPU: LAYERS, MOE), ptests (multi-GPU
# tests), serve_tp (serve under torchrun on every GPU, as serve), reference (xAI's JAX code on the same GPU, from a git-ignored .ref/ holding its
# model.py, runners.py, checkpoint.py, tokenizer.model, ref_jax_bench.py and the dm-haiku, jmp
# and tabulate wheels; carry .ref), serve (grok1 serve on 4 random full-width layers under
# bench/serve_load.py; carry .whl with fastapi, uvicorn, pydantic and their needs, and the Grok-1
# tokenizer as .ref/tokenizer.model or $GROK_TOKENIZER).
# At the end everything under $OUT goes into one $OUT/results.tgz (PACK=0 keeps the files as they
# are): the device tool returns only a handful of files from $OUT, and two runs' JSON were lost
# that way (bench/NOTES.md, session 7). Unpack it with `tar xzf results.tgz`.
set -o pipefail
OUT=${OUT:-/tmp/grok1_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH
steps=${*:-tests moe bench}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

# load_test PORT REQUESTS LABEL NAME CMD...: start `CMD --port PORT ...` (a grok1 serve) with the
# Grok-1 tokenizer, wait for /health (warm-up included), drive it with bench/serve_load.py at 32
# concurrent, then stop it with SIGINT (a graceful shutdown; torchrun passes it to every rank).
load_test() {
  local port=$1 requests=$2 label=$3 name=$4; shift 4
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PYTHONPATH NCCL_NVLS_ENABLE=0 setsid "$@" \
    --tokenizer "${GROK_TOKENIZER:-.ref/tokenizer.model}" --max-batch-size 64 --port "$port" \
    --log-level warning > "$OUT/$name.server.log" 2>&1 &
  python3 -c "import time,urllib.request as u
for _ in range(240):
    try: u.urlopen('http://127.0.0.1:$port/health', timeout=2); break
    except Exception: time.sleep(1)"
  PYTHONPATH=/tmp/site:$PYTHONPATH timeout 150 python3 bench/serve_load.py \
    --url "http://127.0.0.1:$port" --requests "$requests" --concurrency 32 --max-tokens 64 \
    --label "$label" --out "$OUT/$name.json" 2>&1 | tail -20 | tee "$OUT/$name.log"
  pkill -INT -f "grok1 serve"; sleep 15; tail -3 "$OUT/$name.server.log"
}

status=0  # the first failing step's exit status is the script's (after packing)
for s in $steps; do
  case $s in
    gate) # the server's GPU tests need fastapi & co: carry .whl (README, Contributing)
          if ls .whl/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
            export PYTHONPATH=/tmp/site:$PYTHONPATH; fi
          timeout 560 python3 bench/gate.py --out "$OUT" 2>&1 | tail -60 | tee "$OUT/gate.log" ;;
    opdiff) timeout 200 python3 bench/op_diff.py --golden ../shared/grok1/golden \
              --out "$OUT/op_diff_golden.json" 2>&1 | tail -45 | tee "$OUT/op_diff_golden.log"
            timeout 200 python3 bench/op_diff.py --layers 2 --out "$OUT/op_diff_full_width.json" \
              2>&1 | tail -45 | tee "$OUT/op_diff_full_width.log" ;;
    tests) timeout 170 python3 -m pytest -q -m gpu tests/ops/test_ops_moe.py tests/ops/test_ops_attention.py \
             tests/ops/test_ops_small.py tests/engine/test_engine_llm.py tests/engine/test_engine_golden.py 2>&1 \
             | tail -40 | tee "$OUT/tests.log" ;;
    gputests) timeout 240 python3 -m pytest -q -m gpu tests 2>&1 | tail -40 | tee "$OUT/gputests.log" ;;
    reference) python3 -m pip install -q --no-index --no-deps --target /tmp/refsite .ref/*.whl
           REF_DIR=$PWD/.ref TOKENIZER=$PWD/.ref/tokenizer.model XLA_PYTHON_CLIENT_PREALLOCATE=false \
             PYTHONPATH=/tmp/refsite:$PYTHONPATH timeout 240 python3 .ref/ref_jax_bench.py 4 1 1024 24 8192 \
             2>&1 | tail -5 | tee "$OUT/reference.log" ;;
    serve) load_test 8000 500 "$GPU, 4 random full-width layers, int8" serve_load \
             python3 -m grok1 serve --dummy-layers 4 --device cuda ;;
    serve_tp) n=$(nvidia-smi -L | wc -l)
           load_test 8001 300 "$n x $GPU, torchrun --tp $n, 4 random full-width layers, int8" \
             "serve_load_tp$n" torchrun --standalone --nproc-per-node "$n" -m grok1 serve --tp "$n" \
             --dummy-layers 4 ;;
    moe) timeout 170 python3 bench/moe.py ${MOE_ARGS:-} --tuned-out "$OUT/moe_tuned.json" 2>&1 \
           | tee "$OUT/moe.log" ;;
    linear) timeout 200 python3 bench/linear.py --tuned-out "$OUT/linear_tuned.json" \
              --out "$OUT/linear_sweep.json" 2>&1 | tee "$OUT/linear.log" ;;
    profile) timeout 60 python3 bench/profile_step.py 2>&1 | tee "$OUT/profile.log" ;;
    parallel) NCCL_NVLS_ENABLE=0 timeout 330 torchrun --standalone --nproc-per-node "$(nvidia-smi -L | wc -l)" \
                bench/parallel_decode.py --layers "${LAYERS:-64}" --moe ${MOE:-tp ep} --profile \
                ${PARALLEL_ARGS:-} --out "$OUT" > "$OUT/parallel_decode.log" 2>&1
              grep -E "^\[|built|skip" "$OUT/parallel_decode.log" ;;
    ptests) NCCL_NVLS_ENABLE=0 timeout 300 python3 -m pytest -q -m gpu tests/parallel/test_parallel_dist.py \
              tests/server/test_server_ranks.py 2>&1 | tail -15 | tee "$OUT/ptests.log" ;;
    bench) [ -s "$OUT/moe_tuned.json" ] && cp "$OUT/moe_tuned.json" grok1/ops/configs/moe.json
           [ -s "$OUT/linear_tuned.json" ] && cp "$OUT/linear_tuned.json" grok1/ops/configs/linear.json
           timeout 120 python3 bench/decode.py --out "$OUT" 2>&1 | tee "$OUT/decode.log"
           timeout 80 python3 bench/prefill.py --out "$OUT" 2>&1 | tee "$OUT/prefill.log" ;;
  esac || { rc=$?; [ "$status" = 0 ] && status=$rc; }
done

if [ "${PACK:-1}" = 1 ]; then
  (cd "$OUT" && tar czf /tmp/grok1_results.tgz . && find . -mindepth 1 -delete \
     && mv /tmp/grok1_results.tgz results.tgz && echo "packed $OUT/results.tgz: $(tar tzf results.tgz | grep -vc '/$') files")
fi
exit "$status"
