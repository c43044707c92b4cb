//! Shared by the router's integration tests: a real etcd, fake engines registered in it,
//! and the router running in-process on a free port.

#![allow(dead_code)]

pub mod fake_engine;
pub mod pd_engine;

use std::time::Duration;

use dlengine_cli::Policy;
use dlengine_router::RouterConfig;
use serde_json::Value;

pub struct RunningRouter {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn config(etcd: &str, policy: Policy) -> RouterConfig {
    RouterConfig {
        host: "127.0.0.1".into(),
        port: 0,
        etcd_endpoints: vec![etcd.into()],
        etcd_tls: None,
        namespace: "test".into(),
        deployment: None,
        policy,
        session_header: "x-session-id".into(),
        api_keys: Vec::new(),
        rate_limit_rps: 0.0,
        max_request_body_bytes: 64 * 1024,
        max_retries: 2,
        request_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(5),
    }
}

impl RunningRouter {
    pub async fn start(config: RouterConfig) -> RunningRouter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dlengine_router::run_with_config(config, listener, async move {
            let _ = stopped.await;
        }));
        RunningRouter { url, stop: Some(stop), task }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }

    /// Waits until `/health` counts `n` workers.
    pub async fn wait_workers(&self, n: u64) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let seen = match client.get(format!("{}/health", self.url)).send().await {
                Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["workers"].as_u64()),
                Err(_) => None,
            };
            if seen == Some(n) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "router never saw {n} workers (last: {seen:?})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap()
    }
}

pub fn completion(model: &str, prompt: &str, stream: bool) -> Value {
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream})
}

/// Sum of a metric's samples whose label text contains `labels`.
pub fn metric_sum(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
