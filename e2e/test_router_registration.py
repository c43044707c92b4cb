"""Registration of real `dlengine serve` processes in a real etcd: the contract's fields,
lease expiry after kill -9, immediate removal after SIGTERM, re-registration after etcd
loses its data."""

import json
import os
import time

import pytest

from test_router_harness import LEASE_TTL, MODEL, MODEL_DIR, Cluster, skip_reason, wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def test_record_carries_the_contract_fields(cluster):
    engine = cluster.engine("reg-a")
    engine.wait_registered()
    record = cluster.etcd.registrations()[engine.key]
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        config = json.load(f)
    assert record["protocol_version"] == 1
    assert record["role"] == "aggregated"
    assert record["instance_id"] == "reg-a"
    assert (record["namespace"], record["deployment"], record["revision"]) == ("e2e", "d", "1")
    assert record["served_model_name"] == MODEL
    assert record["model"]
    assert record["url"] == engine.url
    layout = record["kv_layout"]
    assert layout["layers"] == config["num_hidden_layers"]
    assert layout["kv_heads"] == config.get("num_key_value_heads", config["num_attention_heads"])
    assert layout["head_dim"] == config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    assert layout["block_size"] == 16 and layout["dtype"] in ("f32", "bf16", "f16")
    assert set(record["transfer"]) == {"tcp", "cuda_ipc", "rdma"}
    assert record["capacity"]["max_seqs"] == 16 and record["capacity"]["kv_blocks"] > 0
    assert set(record["load"]) >= {"running", "waiting", "kv_usage", "updated_at"}
    assert record["started_at"] > 1_600_000_000_000
    # Registered only once serving: the URL answers.
    from test_router_harness import http
    assert http("GET", f"{engine.url}/health")[0] == 200


def test_sigterm_removes_the_key_at_once(cluster):
    engine = cluster.engine("reg-term")
    engine.wait_registered()
    engine.process.proc.send_signal(15)
    started = time.monotonic()
    wait_until("key removed after SIGTERM", lambda: engine.key not in cluster.etcd.registrations(), timeout=5, interval=0.05)
    assert time.monotonic() - started < 2.0, "SIGTERM should revoke the lease, not wait for it to expire"
    assert engine.process.terminate(timeout=30) == 0


def test_kill9_key_expires_within_the_lease_ttl(cluster):
    engine = cluster.engine("reg-kill")
    engine.wait_registered()
    time.sleep(LEASE_TTL + 1)  # keep-alives hold it past one TTL
    assert engine.key in cluster.etcd.registrations()
    engine.process.kill9()
    started = time.monotonic()
    wait_until("key expired after kill -9", lambda: engine.key not in cluster.etcd.registrations(), timeout=LEASE_TTL + 5)
    assert time.monotonic() - started <= LEASE_TTL + 1.5


def test_engine_registers_again_after_etcd_loses_its_data(cluster):
    engine = cluster.engine("reg-etcd")
    engine.wait_registered()
    old_lease = cluster.etcd.leases()[engine.key]
    cluster.etcd.restart_empty()  # every key and lease is gone
    # Back under a lease the new etcd granted (re-registration can beat any check for the
    # key's absence, so the lease is what proves it happened).
    wait_until("re-registered under a new lease", lambda: cluster.etcd.leases().get(engine.key) not in (None, old_lease))
    assert engine.process.alive()
