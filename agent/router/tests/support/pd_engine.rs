//! An in-process stand-in for engines of every role, implementing the prefill/decode
//! contract, registered in the real etcd through the real `Registrar`. It records every
//! body it receives and every lease released with `POST /pd/free`.
//!
//! - prefill: answers non-streaming with the first token `P` and a descriptor
//!   `{"lease_id": "<name>-<n>", "engine": "<name>"}`, or with `kv_transfer_params: null`
//!   when `max_tokens` is 1 or the prompt contains `finish-in-prefill` (with
//!   `tool-call`: a chat answer made of a tool call); `prefill-500` → 500.
//! - decode with a descriptor: `P` then ` decoded by <name>`, streamed or not; fails with
//!   503 `kv_transfer_failed` while the shared `kv_failures` budget lasts (or always with
//!   `always_fail_kv`); `layout-400` → 400 `kv_layout_mismatch`; `decode-stall` → never
//!   answers.
//! - aggregated, and decode without a descriptor: `whole by <name>`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use dlengine_registry::{
    Capacity, EtcdConfig, KvLayout, Load, Registrar, RegistrarConfig, RegistrarHandle, Role, TransferEndpoints,
    WorkerRecord, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

#[derive(Clone)]
pub struct Spec {
    pub name: String,
    pub role: Role,
    /// Served model name.
    pub model: String,
    /// The loaded model (`WorkerRecord::model`).
    pub weights: String,
    pub revision: String,
    pub block_size: usize,
}

impl Spec {
    pub fn new(name: &str, role: Role) -> Spec {
        Spec { name: name.into(), role, model: "tiny".into(), weights: "llama-tiny".into(), revision: "r1".into(), block_size: 16 }
    }
}

/// Shared by the engines of a test.
#[derive(Default)]
pub struct Script {
    /// Decode requests with a descriptor that fail with `kv_transfer_failed`.
    pub kv_failures: AtomicUsize,
}

#[derive(Default)]
pub struct Seen {
    pub bodies: Mutex<Vec<Value>>,
    pub frees: Mutex<Vec<String>>,
    /// Requests dropped before they were answered (the router went away).
    pub cancelled: AtomicUsize,
}

struct Shared {
    spec: Spec,
    script: Arc<Script>,
    seen: Arc<Seen>,
    always_fail_kv: bool,
    leases: AtomicUsize,
}

pub struct PdEngine {
    pub name: String,
    pub url: String,
    pub seen: Arc<Seen>,
    _registrar: RegistrarHandle,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for PdEngine {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl PdEngine {
    pub async fn start(etcd: &str, spec: Spec, script: Arc<Script>) -> PdEngine {
        Self::start_with(etcd, spec, script, false).await
    }

    pub async fn start_with(etcd: &str, spec: Spec, script: Arc<Script>, always_fail_kv: bool) -> PdEngine {
        let seen = Arc::new(Seen::default());
        let shared = Arc::new(Shared { spec: spec.clone(), script, seen: seen.clone(), always_fail_kv, leases: AtomicUsize::new(0) });
        let app = Router::new()
            .route("/v1/completions", post(generate))
            .route("/v1/chat/completions", post(generate))
            .route("/pd/free", post(free))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let registrar = register(etcd, &spec, &url);
        PdEngine { name: spec.name, url, seen, _registrar: registrar, server }
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.seen.bodies.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.bodies.lock().unwrap().len()
    }

    pub fn frees(&self) -> Vec<String> {
        self.seen.frees.lock().unwrap().clone()
    }

    /// Waits up to 5 s for `n` releases (they are sent in the background).
    pub async fn wait_frees(&self, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let frees = self.frees();
            if frees.len() >= n || tokio::time::Instant::now() >= deadline {
                return frees;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn register(etcd: &str, spec: &Spec, url: &str) -> RegistrarHandle {
    let record = WorkerRecord {
        protocol_version: PROTOCOL_VERSION,
        instance_id: spec.name.clone(),
        namespace: "test".into(),
        deployment: "d".into(),
        revision: spec.revision.clone(),
        role: spec.role,
        model: spec.weights.clone(),
        served_model_name: spec.model.clone(),
        url: url.into(),
        kv_layout: KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_size: spec.block_size, dtype: "f32".into() },
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
    match body.get("prompt").and_then(Value::as_str) {
        Some(prompt) => prompt.to_string(),
        None => body.get("messages").map(|m| m.to_string()).unwrap_or_default(),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
    (status, Json(body)).into_response()
}

async fn free(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let id = body["lease_id"].as_str().unwrap_or_default().to_string();
    shared.seen.frees.lock().unwrap().push(id);
    Json(json!({"freed": true})).into_response()
}

/// Counts a request that was dropped before it was answered.
struct Pending {
    seen: Arc<Seen>,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.seen.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn generate(State(shared): State<Arc<Shared>>, uri: Uri, Json(body): Json<Value>) -> Response {
    shared.seen.bodies.lock().unwrap().push(body.clone());
    let chat = uri.path().ends_with("/chat/completions");
    let prompt = prompt_of(&body);
    let name = shared.spec.name.clone();
    let descriptor = body.get("kv_transfer_params").filter(|d| !d.is_null());
    match (shared.spec.role, descriptor) {
        (Role::Prefill, _) => prefill(&shared, &body, &prompt, chat),
        (Role::Decode, Some(_)) => {
            if prompt.contains("decode-stall") {
                let _pending = Pending { seen: shared.seen.clone(), answered: false };
                std::future::pending::<()>().await;
            }
            if prompt.contains("layout-400") {
                return error(StatusCode::BAD_REQUEST, "kv_layout_mismatch", "KV layout differs");
            }
            let budget = shared.script.kv_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if shared.always_fail_kv || budget {
                return error(StatusCode::SERVICE_UNAVAILABLE, "kv_transfer_failed", &format!("{name} could not pull the KV"));
            }
            answer(&body, chat, &["P", " decoded", &format!(" by {name}")])
        }
        _ => answer(&body, chat, &[&format!("whole by {name}")]),
    }
}

fn prefill(shared: &Shared, body: &Value, prompt: &str, chat: bool) -> Response {
    if prompt.contains("prefill-500") {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "prefill broke");
    }
    let finished = body["max_tokens"].as_u64() == Some(1) || prompt.contains("finish-in-prefill");
    let descriptor = if finished {
        Value::Null
    } else {
        let n = shared.leases.fetch_add(1, Ordering::SeqCst);
        json!({"lease_id": format!("{}-{n}", shared.spec.name), "engine": shared.spec.name, "first_token": 7})
    };
    let finish = if finished { json!("length") } else { Value::Null };
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4});
    let mut answer = if chat {
        let message = if prompt.contains("tool-call") {
            json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]})
        } else {
            json!({"role": "assistant", "content": "P"})
        };
        let finish = if prompt.contains("tool-call") { json!("tool_calls") } else { finish };
        json!({"id": "chatcmpl-p", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish, "stop_reason": null}], "usage": usage})
    } else {
        json!({"id": "cmpl-p", "object": "text_completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "text": "P", "logprobs": null, "finish_reason": finish, "stop_reason": null}], "usage": usage})
    };
    answer["kv_transfer_params"] = descriptor;
    Json(answer).into_response()
}

/// A whole answer made of `pieces`, streamed (one event each) or not, in the engines' shapes.
fn answer(body: &Value, chat: bool, pieces: &[&str]) -> Response {
    let usage = json!({"prompt_tokens": 3, "completion_tokens": pieces.len(), "total_tokens": 3 + pieces.len()});
    let stream = body["stream"].as_bool() == Some(true);
    if !stream {
        let text: String = pieces.concat();
        let value = if chat {
            json!({"id": "chatcmpl-d", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}], "usage": usage})
        } else {
            json!({"id": "cmpl-d", "object": "text_completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}], "usage": usage})
        };
        return Json(value).into_response();
    }
    let mut events = String::new();
    for (i, piece) in pieces.iter().enumerate() {
        let finish = if i + 1 == pieces.len() { json!("stop") } else { Value::Null };
        let chunk = if chat {
            let delta = if i == 0 { json!({"role": "assistant", "content": piece}) } else { json!({"content": piece}) };
            json!({"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        } else {
            json!({"id": "cmpl-d", "object": "text_completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": finish}]})
        };
        events.push_str(&format!("data: {chunk}\n\n"));
    }
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let chunk = json!({"id": "d", "object": object, "created": 1, "model": body["model"], "choices": [], "usage": usage});
        events.push_str(&format!("data: {chunk}\n\n"));
    }
    events.push_str("data: [DONE]\n\n");
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from(Bytes::from(events))).into_response()
}
