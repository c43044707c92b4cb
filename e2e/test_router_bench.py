"""Benchmark (opt-in: ROUTER_BENCH=1): cache-aware vs round-robin routing on a shared-prefix
workload over two real engines whose KV caches hold only about half of the prefixes. Prints
the prefix-cache hit rate (cached prompt tokens / prompt tokens, from the answers' usage)
and the throughput through the router. Bounded: a fixed request count, loopback only."""

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
# ~360 prompt tokens (~23 blocks of 16) per prefix with the fixture tokenizer: 256 blocks
# hold the 8 prefixes cache-aware routing gives each engine, not the 16 round-robin does.
KV_BLOCKS = "256"


def prefix_text(i):
    words = " ".join(f"topic{i}-word{j}" for j in range(40))
    return f"Document {i}: {words}. Question:"


def run_workload(policy):
    cluster = Cluster()
    try:
        engines = [cluster.engine(f"bench-{policy}-{k}", extra=["--num-kv-blocks", KV_BLOCKS, "--max-model-len", "512"]) for k in range(2)]
        for engine in engines:
            engine.wait_registered()
        router = cluster.router(policy)
        router.wait_workers(2)
        # Interleave prefixes so that each one comes back after the others have passed.
        prompts = [f"{prefix_text(p)} q{r}" for r in range(REQUESTS_PER_PREFIX) for p in range(PREFIXES)]
        started = time.monotonic()
        def send(prompt):
            status, body = http("POST", f"{router.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4}, timeout=60)
            assert status == 200, body
            usage = body["usage"]
            return usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        with ThreadPoolExecutor(4) as pool:
            usages = list(pool.map(send, prompts))
        elapsed = time.monotonic() - started
        hit_rate = sum(c for _, c in usages) / sum(p for p, _ in usages)
        return {"policy": policy, "requests_per_s": len(prompts) / elapsed, "prefix_hit_rate": hit_rate}
    finally:
        cluster.close()


def test_cache_aware_vs_round_robin():
    results = [run_workload("cache-aware"), run_workload("round-robin")]
    for r in results:
        print(f"{r['policy']:>12}: {r['requests_per_s']:7.1f} req/s, prefix hit rate {r['prefix_hit_rate']:.2f}")
    cache_aware, round_robin = results
    assert cache_aware["prefix_hit_rate"] > round_robin["prefix_hit_rate"]
