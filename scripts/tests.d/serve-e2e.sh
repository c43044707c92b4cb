#!/usr/bin/env bash
# End-to-end test of `dlengine serve` with the official `openai` Python client: starts the
# real binary on the tiny fixture model (CPU) on a free port, waits for /health, runs
# e2e/test_serve_openai.py, then sends SIGTERM and requires a clean exit 0.
# Runs from the repository root after `cargo test --workspace` built target/debug/dlengine,
# with the venv's python first on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

source scripts/cargo-selection.sh
build_test_binaries

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
target/debug/dlengine serve fixtures/models/qwen3-tiny --host 127.0.0.1 --port "$port" --device cpu \
  --drain-timeout-secs 20 >"$log" 2>&1 &
pid=$!
cleanup() {
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$log"
}
trap cleanup EXIT INT TERM
fail() {
  echo "serve-e2e: $1; server log:" >&2
  cat "$log" >&2
  exit 1
}

python - "$port" "$pid" <<'PY' || fail "the server did not become healthy"
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("timed out")
PY

DLENGINE_URL="http://127.0.0.1:$port" python -m pytest -q -p no:cacheprovider e2e/test_serve_openai.py "$@" \
  || fail "pytest failed"

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 0 ] || fail "after SIGTERM the server exited with $status, not 0"
echo "serve-e2e: the server drained and exited 0"
