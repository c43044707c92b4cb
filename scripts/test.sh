#!/usr/bin/env bash
# Runs the whole test suite: every Rust test in the workspace, then each script in
# scripts/tests.d/ (cross-process and Python-driven tests). Expects scripts/install-deps.sh
# to have run. Prints one closing line "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# NVRTC from PyPI lets the CUDA crate compile-check every kernel without a GPU.
nvrtc_lib=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
[ -n "$nvrtc_lib" ] && export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

passed=0; failed=0
run_part() {
  local name=$1; shift
  echo "=== $name"
  local start=$SECONDS
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $name"; fi
  echo "=== $name: $((SECONDS - start)) s"
}

# One cargo selection for everything (the scripts in tests.d use it too). The rdma
# feature builds the RDMA verbs code: no device here, so its tests prove it builds,
# links and fails clearly.
source scripts/cargo-selection.sh
run_part "cargo test $DLENGINE_CARGO_SELECTION" cargo test $DLENGINE_CARGO_SELECTION --no-fail-fast
for t in scripts/tests.d/*.sh; do
  [ -e "$t" ] || continue
  run_part "$t" bash "$t"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
