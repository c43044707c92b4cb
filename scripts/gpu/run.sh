#!/usr/bin/env bash
# Runs on the GPU machine from the repository root (binaries in .carry/, built by
# scripts/gpu/build.sh). Stages: tests, hf MODEL..., latency MODEL..., throughput MODEL,
# serving MODEL, pd MODEL (needs two GPUs). Logs and JSON results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/dlengine-out}
MODELS=${MODELS:-/tmp/models}
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1 RUST_LOG=${RUST_LOG:-info}
stage=$1; shift
case "$stage" in
  tests)
    .carry/gpu_vs_cpu --test-threads=1 --nocapture 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^test |cosine|diverged|panicked|result" ;;
  hf)
    python3 scripts/gpu/make_models.py "$MODELS" "$@" 2>&1 | grep -v Warning
    for m in "$@"; do
      python3 scripts/gpu/hf_compare.py "$MODELS/$m" .carry/score "$OUT/hf-$m.json" 2>>"$OUT/hf.log"
      if [ -n "${CHUNKED:-}" ]; then
        python3 scripts/gpu/hf_compare.py "$MODELS/$m" .carry/score "$OUT/hf-$m-chunk64.json" --chunk 64 2>>"$OUT/hf.log"
      fi
    done ;;
  latency)
    python3 scripts/gpu/make_models.py "$MODELS" "$@" 2>&1 | grep -v Warning
    for m in "$@"; do
      .carry/dlengine bench latency --model "$MODELS/$m" --device cuda --prompt-lens 128,1024,4096 --output-len 256 \
        --json "$OUT/latency-$m.json" 2>>"$OUT/bench.log"
    done ;;
  throughput)
    m=$1; shift
    python3 scripts/gpu/make_models.py "$MODELS" "$m" 2>&1 | grep -v Warning
    .carry/dlengine bench throughput --model "$MODELS/$m" --device cuda --prompt-lens 1024 --output-len 1024 \
      --num-prompts "${1:-512}" --json "$OUT/throughput-$m.json" 2>>"$OUT/bench.log" ;;
  serving)
    m=$1; shift
    python3 scripts/gpu/make_models.py "$MODELS" "$m" 2>&1 | grep -v Warning
    .carry/dlengine serve "$MODELS/$m" --device cuda --port 8123 --served-model-name "$m" 2>"$OUT/serve.log" &
    pid=$!
    for _ in $(seq 1 300); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
    .carry/dlengine bench serving --url http://127.0.0.1:8123 --prompt-lens 1024 --output-len 256 \
      --num-prompts 16 --concurrency 1,8,32,128,256 --json "$OUT/serving-$m.json" 2>>"$OUT/bench.log"
    kill -TERM $pid; wait $pid ;;
  pd)
    m=$1; shift
    python3 scripts/gpu/make_models.py "$MODELS" "$m" 2>&1 | grep -v Warning
    python3 scripts/gpu/pd_bench.py "$MODELS/$m" .carry/dlengine "$OUT/pd-$m.json" ${BEFORE_BIN:-} ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
