//! An in-process stand-in for `dlengine serve`, for testing the router's failure handling
//! with failures a real engine cannot be made to produce on cue. It registers in the real
//! etcd through the real `Registrar`; its behaviour is chosen by words in the prompt:
//! `status-500`, `die-after-2` (stream cut after two events), `stall` (stream goes silent),
//! `gate` (stream pauses until the test opens the gate).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use dlengine_registry::{
    Capacity, EtcdConfig, KvLayout, Load, Registrar, RegistrarConfig, RegistrarHandle, Role, TransferEndpoints,
    WorkerRecord, PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Counters {
    pub hits: AtomicUsize,
    /// Streams dropped before they finished (the router went away).
    pub cancelled: AtomicUsize,
}

struct Shared {
    name: String,
    counters: Arc<Counters>,
    gate: Arc<Notify>,
}

pub struct FakeEngine {
    pub name: String,
    pub url: String,
    pub counters: Arc<Counters>,
    pub gate: Arc<Notify>,
    registrar: Option<RegistrarHandle>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeEngine {
    pub async fn start(etcd: &str, name: &str, model: &str) -> FakeEngine {
        let counters = Arc::new(Counters::default());
        let gate = Arc::new(Notify::new());
        let shared = Arc::new(Shared { name: name.into(), counters: counters.clone(), gate: gate.clone() });
        let app = Router::new()
            .route("/v1/completions", post(generate))
            .route("/v1/chat/completions", post(generate))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let registrar = register(etcd, name, model, &url);
        FakeEngine { name: name.into(), url, counters, gate, registrar: Some(registrar), server }
    }

    pub fn hits(&self) -> usize {
        self.counters.hits.load(Ordering::SeqCst)
    }

    /// Graceful: revoke the lease first, as `dlengine serve` does on SIGTERM.
    pub async fn deregister(&mut self) {
        if let Some(registrar) = self.registrar.take() {
            registrar.shutdown().await;
        }
    }

    /// Crash: the HTTP server stops at once; the lease is left to expire.
    pub fn crash(&mut self) {
        self.server.abort();
        if let Some(registrar) = self.registrar.take() {
            drop(registrar);
        }
    }
}

fn register(etcd: &str, name: &str, model: &str, url: &str) -> RegistrarHandle {
    let record = WorkerRecord {
        protocol_version: PROTOCOL_VERSION,
        instance_id: name.into(),
        namespace: "test".into(),
        deployment: "d".into(),
        revision: "1".into(),
        role: Role::Aggregated,
        model: model.into(),
        served_model_name: model.into(),
        url: url.into(),
        kv_layout: KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_size: 16, dtype: "f32".into() },
        transfer: TransferEndpoints::default(),
        capacity: Capacity { max_seqs: 8, kv_blocks: 64 },
        load: Load::default(),
        started_at: 1,
    };
    let config = RegistrarConfig {
        etcd: EtcdConfig::new(vec![etcd.into()]),
        lease_ttl: Duration::from_secs(3),
        load_interval: Duration::from_secs(1),
        revoke_timeout: Duration::from_secs(2),
    };
    let handle = Registrar::spawn(config, record, Arc::new(Load::default));
    handle.mark_ready();
    handle
}

fn prompt_of(body: &Value) -> String {
    if let Some(prompt) = body.get("prompt").and_then(Value::as_str) {
        return prompt.to_string();
    }
    body.get("messages").map(|m| m.to_string()).unwrap_or_default()
}

async fn generate(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    shared.counters.hits.fetch_add(1, Ordering::SeqCst);
    let prompt = prompt_of(&body);
    if prompt.contains("status-500") {
        let error = json!({"error": {"message": format!("{} is broken", shared.name), "type": "internal_error", "param": null, "code": null}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(json!({
            "id": "cmpl-1", "object": "text_completion", "model": body["model"],
            "choices": [{"index": 0, "text": format!("served by {}", shared.name), "finish_reason": "stop"}],
        }))
        .into_response();
    }
    stream(shared, prompt)
}

struct CancelGuard {
    counters: Arc<Counters>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.counters.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn event(name: &str, i: usize) -> Bytes {
    let chunk = json!({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": format!("{name}:{i} "), "finish_reason": null}]});
    Bytes::from(format!("data: {chunk}\n\n"))
}

fn stream(shared: Arc<Shared>, prompt: String) -> Response {
    let mut guard = CancelGuard { counters: shared.counters.clone(), finished: false };
    let body = async_stream(move |tx| async move {
        let name = shared.name.clone();
        for i in 0..3 {
            if prompt.contains("die-after-2") && i == 2 {
                let _ = tx.send(Err(std::io::Error::other("engine died"))).await;
                return;
            }
            if tx.send(Ok(event(&name, i))).await.is_err() {
                return;
            }
            if prompt.contains("stall") {
                std::future::pending::<()>().await;
            }
            if prompt.contains("gate") && i == 0 {
                shared.gate.notified().await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        guard.finished = true;
        drop(guard);
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

/// A body stream fed by a task; the task (and the state it holds) is dropped as soon as
/// the body is, like a real server noticing its client left.
fn async_stream<F, Fut>(produce: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let watcher = tx.clone();
    let producing = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = producing => {}
            _ = watcher.closed() => {}
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
