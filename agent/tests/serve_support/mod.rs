//! Runs the real `dlengine serve` binary on the CPU with a fixture model, on a free port,
//! for the HTTP tests. The process is killed when the handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MODEL: &str = "qwen3-tiny";

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    log: Arc<Mutex<String>>,
}

fn fixture_model(name: &str) -> String {
    format!("{}/../fixtures/models/{name}", env!("CARGO_MANIFEST_DIR"))
}

impl Server {
    /// Starts the server and waits until `/health` says 200.
    pub async fn start(extra: &[&str]) -> Server {
        let server = Self::spawn(MODEL, extra);
        server.wait_healthy().await;
        server
    }

    /// Starts the server without waiting for the model to load.
    pub fn spawn(model: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dlengine"))
            .args(["serve", &fixture_model(model), "--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
            .args(["--cpu-kv-cache-mib", "64"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dlengine serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => panic!("the server did not say where it listens; log:\n{}", log.lock().unwrap()),
        };
        Server { child, base, client: reqwest::Client::new(), log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(self.url("/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server never became healthy; log:\n{}", self.log());
    }

    pub async fn health(&self) -> u16 {
        self.client.get(self.url("/health")).send().await.expect("health").status().as_u16()
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(&body).send().await.expect("request")
    }

    /// POST and parse the JSON answer, asserting the status.
    pub async fn post_json(&self, path: &str, body: serde_json::Value, status: u16) -> serde_json::Value {
        let response = self.post(path, body.clone()).await;
        let got = response.status().as_u16();
        let text = response.text().await.expect("body");
        assert_eq!(got, status, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// A streamed POST's `data:` events, `[DONE]` included as a string.
    pub async fn post_sse(&self, path: &str, body: serde_json::Value) -> Vec<serde_json::Value> {
        let response = self.post(path, body.clone()).await;
        assert_eq!(response.status(), 200, "POST {path} {body}");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        parse_sse(&response.text().await.expect("body"))
    }

    /// One metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.client.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("body");
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Polls `/metrics` until `name` reads `want` (engine gauges trail the answers a little).
    pub async fn wait_for_metric(&self, name: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.metric(name).await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{name} stayed at {got}, wanted {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("the server did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_sse(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}"));
            serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.to_owned()))
        })
        .collect()
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
