"""Benchmark (opt-in: ROUTER_BENCH=1): cache-aware vs round-robin routing on a shared-prefix
workload over two real engines whose KV caches hold only about half of the prefixes. Prints
each engine's prefix-cache hit rate (from its /metrics) and the throughput through the
router. Bounded: a fixed request count, loopback only."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_router_harness import MODEL, Cluster, http, skip_reason

pytestmark = [
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.skipif(os.environ.get("ROUTER_BENCH") != "1", reason="benchmark: set ROUTER_BENCH=1"),
]

PREFIXES = 16
REQUESTS_PER_PREFIX = 12
# ~100 prompt tokens per prefix with the fixture tokenizer; 96 blocks of 16 tokens hold
# about half of the prefixes on one engine.
KV_BLOCKS = "96"


def prefix_text(i):
    words = " ".join(f"topic{i}-word{j}" for j in range(40))
    return f"Document {i}: {words}. Question:"


def engine_hit_rate(engine):
    _, text = http("GET", f"{engine.url}/metrics")
    for line in text.splitlines():
        if line.startswith("dlengine_prefix_cache_hit_rate"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def run_workload(policy):
    cluster = Cluster()
    try:
        engines = [cluster.engine(f"bench-{policy}-{k}", extra=["--num-kv-blocks", KV_BLOCKS]) for k in range(2)]
        for engine in engines:
            engine.wait_registered()
        router = cluster.router(policy)
        router.wait_workers(2)
        # Interleave prefixes so that each one comes back after the others have passed.
        prompts = [f"{prefix_text(p)} q{r}" for r in range(REQUESTS_PER_PREFIX) for p in range(PREFIXES)]
        started = time.monotonic()
        def send(prompt):
            status, _ = http("POST", f"{router.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4}, timeout=60)
            return status
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(send, prompts))
        elapsed = time.monotonic() - started
        assert all(s == 200 for s in statuses)
        rates = [engine_hit_rate(e) for e in engines]
        return {"policy": policy, "requests_per_s": len(prompts) / elapsed, "prefix_hit_rate": rates}
    finally:
        cluster.close()


def test_cache_aware_vs_round_robin():
    results = [run_workload("cache-aware"), run_workload("round-robin")]
    for r in results:
        print(f"{r['policy']:>12}: {r['requests_per_s']:7.1f} req/s, engine prefix hit rates "
              + ", ".join(f"{x:.2f}" for x in r["prefix_hit_rate"]))
