#!/usr/bin/env bash
# End-to-end tests of etcd registration and `dlengine router`: a real etcd, real
# `dlengine serve` engines on the tiny fixture model, real router processes, and the
# official `openai` client. Runs from the repository root after `cargo test --workspace`
# built target/debug/dlengine, with the venv's python first on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v etcd >/dev/null; then
  echo "router-e2e: etcd is not installed (scripts/install-deps.sh installs etcd-server)" >&2
  exit 1
fi
source scripts/cargo-selection.sh
build_test_binaries

# The fixtures stop what they start; the harness also writes every pid it starts to this
# file, so that nothing outlives the script even if pytest itself is killed.
export ROUTER_E2E_PIDS
ROUTER_E2E_PIDS=$(mktemp)
cleanup() {
  while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$ROUTER_E2E_PIDS"
  rm -f "$ROUTER_E2E_PIDS"
}
trap cleanup EXIT INT TERM

python -m pytest -q -p no:cacheprovider e2e/test_router_registration.py e2e/test_router_e2e.py e2e/test_router_pd.py "$@"
