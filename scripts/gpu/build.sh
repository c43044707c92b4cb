#!/usr/bin/env bash
# Builds, on this (CPU) machine, what the GPU machine runs, into .carry/ (git-ignored):
# the release dlengine binary, the `score` example and the GPU test binary, stripped.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p dlengine --bin dlengine
cargo build --release -p dlengine-cuda --example score
test_bin=$(cargo test --release -p dlengine-cuda --test gpu_vs_cpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_vs_cpu" and m.get("executable"):
        print(m["executable"])')
mkdir -p .carry
cp target/release/dlengine target/release/examples/score "$test_bin" .carry/
mv .carry/"$(basename "$test_bin")" .carry/gpu_vs_cpu
strip .carry/dlengine .carry/score .carry/gpu_vs_cpu
du -sh .carry/*
