//! Router overhead benchmark (ignored by default; run with
//! `cargo test -p dlengine-router --test router_overhead -- --ignored --nocapture`):
//! latency of a non-streaming completion straight to an in-process engine stand-in versus
//! through the router, at concurrency 1 and 64, on loopback. The stand-in answers at once,
//! so the difference is the router's own cost (an HTTP hop, validation, routing).

mod support;

use std::time::{Duration, Instant};

use dlengine_cli::Policy;
use dlengine_registry::testing::EtcdServer;
use support::fake_engine::FakeEngine;
use support::{completion, config, RunningRouter};

const REQUESTS_PER_CLIENT_SEQUENTIAL: usize = 2000;
const REQUESTS_PER_CLIENT_CONCURRENT: usize = 50;

async fn latencies(url: String, clients: usize, per_client: usize) -> Vec<Duration> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    let body = serde_json::to_vec(&completion("tiny", "measure me", false)).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let started = Instant::now();
                let response = client.post(&url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                seen.push(started.elapsed());
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn router_overhead() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let engine = FakeEngine::start(&etcd.endpoint(), "a", "tiny").await;
    let router = RunningRouter::start(config(&etcd.endpoint(), Policy::CacheAware)).await;
    router.wait_workers(1).await;
    for (clients, per_client) in [(1, REQUESTS_PER_CLIENT_SEQUENTIAL), (64, REQUESTS_PER_CLIENT_CONCURRENT)] {
        // Warm both paths' connection pools first.
        latencies(format!("{}/v1/completions", engine.url), clients, 5).await;
        latencies(format!("{}/v1/completions", router.url), clients, 5).await;
        let direct = latencies(format!("{}/v1/completions", engine.url), clients, per_client).await;
        let routed = latencies(format!("{}/v1/completions", router.url), clients, per_client).await;
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (d, r) = (percentile(&direct, p), percentile(&routed, p));
            println!(
                "concurrency {clients:>2} {name}: direct {:>8.3} ms, via router {:>8.3} ms, overhead {:>8.3} ms",
                d.as_secs_f64() * 1e3,
                r.as_secs_f64() * 1e3,
                (r.as_secs_f64() - d.as_secs_f64()) * 1e3
            );
        }
    }
    router.stop().await;
}
