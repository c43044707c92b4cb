//! An in-process stand-in for engines of every role, implementing the prefill/decode
//! contract, registered in the real etcd through the real `Registrar`. It records every
//! body it receives and every lease released with `POST /pd/free`.
//!
//! - prefill: answers non-streaming with the first token `P` and a descriptor
//!   `{"lease_id": "<name>-<n>", "engine": "<name>", "first_token": 7}`, or with
//!   `kv_transfer_params: null` when `max_tokens` (or `max_completion_tokens`) is 1 or the
//!   prompt contains `finish-in-prefill` (with `tool-call`: a chat answer made of a tool
//!   call); `prefill-500` → 500. It ignores `early_descriptor`, as an engine may.
//! - prefill started with [`Spec::early`], asked for `"early_descriptor": true`: answers as
//!   a real engine does (`agent/src/serve/pd/handoff.rs`), `application/x-ndjson` in two
//!   lines: `{"kv_transfer_params": <early descriptor>}` (no `first_token`, a
//!   `first_token_url` instead), then the answer above with the full descriptor. What
//!   follows the first line waits while [`PdEngine::hold_second_lines`] holds it, and can be
//!   scripted to fail ([`SecondLine`], [`PdEngine::script_second_lines`]). The first token
//!   is sampled as soon as the first line is out; `POST /pd/first_token` answers it, or
//!   (a long poll) the failure of a request scripted to fail, or aborted, before it.
//!   [`PdEngine::early_state`] tells how far each early answer got.
//! - decode with a descriptor: `P` then ` decoded by <name>`, streamed or not; fails with
//!   503 `kv_transfer_failed` while the shared `kv_failures` budget lasts (or always with
//!   `always_fail_kv`, or for descriptors of the prefill engines in `unpullable`), and
//!   when the first token of an early descriptor cannot be fetched from prefill;
//!   `layout-400` → 400 `kv_layout_mismatch`; `decode-stall` → never answers.
//! - aggregated, and decode without a descriptor: `whole by <name>`.

use std::collections::{HashMap, VecDeque};
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
use tokio::sync::watch;

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
    /// A prefill engine that honours `early_descriptor` (two JSON lines).
    pub early: bool,
}

impl Spec {
    pub fn new(name: &str, role: Role) -> Spec {
        Spec {
            name: name.into(),
            role,
            model: "tiny".into(),
            weights: "llama-tiny".into(),
            revision: "r1".into(),
            block_size: 16,
            early: false,
        }
    }

    /// Answers early descriptors when asked, as a real prefill engine does.
    pub fn early(self) -> Spec {
        Spec { early: true, ..self }
    }
}

/// Shared by the engines of a test.
#[derive(Default)]
pub struct Script {
    /// Decode requests with a descriptor that fail with `kv_transfer_failed`.
    pub kv_failures: AtomicUsize,
    /// Prefill engines (names) whose KV no decode engine can pull: their descriptors get
    /// 503 `kv_transfer_failed` (say, their transfer endpoint is unreachable).
    pub unpullable: Mutex<Vec<String>>,
}

/// What an early answer does after its first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondLine {
    /// The answer, with the full descriptor (what a real engine does).
    Answer,
    /// Nothing: the connection stays open, the first token was sampled (a stalled engine).
    Never,
    /// The connection breaks: the request died before its first token (once decode asked
    /// for it, so that the first line surely went out).
    Drop,
    /// `{"error": ...}`: the request failed before its first token (likewise).
    Error,
}

/// How far an early answer got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Early {
    /// The first line is out, nothing after it (yet).
    FirstLine,
    /// The second line is out too.
    SecondLine,
    /// Written to its end.
    Ended,
    /// The connection was closed by the router before the end.
    Aborted,
    /// This engine broke the connection after the first line ([`SecondLine::Drop`]).
    Dropped,
}

/// An early lease's first token, as `POST /pd/first_token` sees it.
struct FirstToken {
    asked: bool,
    /// The token id, or why the request never sampled it.
    token: Option<Result<u32, String>>,
}

/// An early prefill engine's script, changed by the test at any time.
struct EarlyScript {
    /// While true, what follows a first line waits.
    hold: watch::Sender<bool>,
    /// The next early answers' second lines, in order; then [`SecondLine::Answer`].
    second_lines: Mutex<VecDeque<SecondLine>>,
}

#[derive(Default)]
pub struct Seen {
    pub bodies: Mutex<Vec<Value>>,
    pub frees: Mutex<Vec<String>>,
    /// Requests dropped before they were answered (the router went away).
    pub cancelled: AtomicUsize,
    /// Early answers by lease id.
    pub early: Mutex<HashMap<String, Early>>,
    /// Leases whose first token was asked for (`POST /pd/first_token`), in order.
    pub first_token_asks: Mutex<Vec<String>>,
}

struct Shared {
    spec: Spec,
    url: String,
    script: Arc<Script>,
    seen: Arc<Seen>,
    always_fail_kv: bool,
    leases: AtomicUsize,
    early: Arc<EarlyScript>,
    /// Early leases' first tokens.
    first_tokens: Mutex<HashMap<String, Arc<watch::Sender<FirstToken>>>>,
    /// Decode engines fetch first tokens with it.
    client: reqwest::Client,
}

pub struct PdEngine {
    pub name: String,
    pub url: String,
    pub seen: Arc<Seen>,
    early: Arc<EarlyScript>,
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
        let early = Arc::new(EarlyScript { hold: watch::Sender::new(false), second_lines: Mutex::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            spec: spec.clone(),
            url: url.clone(),
            script,
            seen: seen.clone(),
            always_fail_kv,
            leases: AtomicUsize::new(0),
            early: early.clone(),
            first_tokens: Mutex::default(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap(),
        });
        let app = Router::new()
            .route("/v1/completions", post(generate))
            .route("/v1/chat/completions", post(generate))
            .route("/pd/free", post(free))
            .route("/pd/first_token", post(first_token))
            .with_state(shared);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let registrar = register(etcd, &spec, &url);
        PdEngine { name: spec.name, url, seen, early, _registrar: registrar, server }
    }

    /// Early answers keep what follows their first line until [`release_second_lines`](Self::release_second_lines).
    pub fn hold_second_lines(&self) {
        self.early.hold.send_replace(true);
    }

    pub fn release_second_lines(&self) {
        self.early.hold.send_replace(false);
    }

    /// What the next early answers do after their first line, in order (then they answer).
    pub fn script_second_lines(&self, lines: &[SecondLine]) {
        self.early.second_lines.lock().unwrap().extend(lines.iter().copied());
    }

    pub fn early_state(&self, lease: &str) -> Option<Early> {
        self.seen.early.lock().unwrap().get(lease).copied()
    }

    /// Waits up to 5 s for the early answer of `lease` to reach `state`; returns the last state seen.
    pub async fn wait_early(&self, lease: &str, state: Early) -> Option<Early> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.early_state(lease);
            if seen == Some(state) || tokio::time::Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn first_token_asks(&self) -> Vec<String> {
        self.seen.first_token_asks.lock().unwrap().clone()
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

/// `POST /pd/first_token`: an early lease's first token, once sampled (a long poll).
async fn first_token(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let id = body["lease_id"].as_str().unwrap_or_default().to_string();
    shared.seen.first_token_asks.lock().unwrap().push(id.clone());
    let Some(slot) = shared.first_tokens.lock().unwrap().get(&id).cloned() else {
        return error(StatusCode::NOT_FOUND, "kv_transfer_failed", "unknown or expired KV lease");
    };
    slot.send_modify(|t| t.asked = true);
    let mut sampled = slot.subscribe();
    let token = match tokio::time::timeout(Duration::from_secs(5), sampled.wait_for(|t| t.token.is_some())).await {
        Ok(Ok(t)) => t.token.clone().unwrap(),
        _ => Err("prefill sampled no first token in time".into()),
    };
    match token {
        Ok(token) => Json(json!({"first_token": {"token_id": token, "logprob": 0.0, "top": []}})).into_response(),
        Err(why) => error(StatusCode::NOT_FOUND, "kv_transfer_failed", &why),
    }
}

/// Decode's side of an early descriptor: the first token from prefill, or why not.
async fn fetch_first_token(shared: &Shared, descriptor: &Value) -> Result<(), String> {
    let url = descriptor["first_token_url"].as_str().ok_or("an early descriptor without first_token_url")?;
    let response = shared.client.post(url).json(&json!({"lease_id": descriptor["lease_id"]})).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    match answer["first_token"]["token_id"].as_u64() {
        Some(_) if status.is_success() => Ok(()),
        _ => Err(format!("{url} answered {status}: {answer}")),
    }
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
        (Role::Decode, Some(descriptor)) => {
            if prompt.contains("decode-stall") {
                let _pending = Pending { seen: shared.seen.clone(), answered: false };
                std::future::pending::<()>().await;
            }
            if prompt.contains("layout-400") {
                return error(StatusCode::BAD_REQUEST, "kv_layout_mismatch", "KV layout differs");
            }
            let budget = shared.script.kv_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            let from = descriptor["engine"].as_str().unwrap_or_default();
            let unpullable = shared.script.unpullable.lock().unwrap().iter().any(|p| p == from);
            if shared.always_fail_kv || budget || unpullable {
                return error(StatusCode::SERVICE_UNAVAILABLE, "kv_transfer_failed", &format!("{name} could not pull the KV"));
            }
            if descriptor.get("first_token").is_none() {
                if let Err(why) = fetch_first_token(&shared, descriptor).await {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "kv_transfer_failed", &format!("fetching prefill's first token: {why}"));
                }
            }
            answer(&body, chat, &["P", " decoded", &format!(" by {name}")])
        }
        _ => answer(&body, chat, &[&format!("whole by {name}")]),
    }
}

fn prefill(shared: &Arc<Shared>, body: &Value, prompt: &str, chat: bool) -> Response {
    if prompt.contains("prefill-500") {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "prefill broke");
    }
    let lease = || format!("{}-{}", shared.spec.name, shared.leases.fetch_add(1, Ordering::SeqCst));
    let descriptor = |lease: &str| json!({"lease_id": lease, "engine": shared.spec.name, "first_token": 7});
    let one_token = ["max_tokens", "max_completion_tokens"].iter().any(|f| body[*f].as_u64() == Some(1));
    let finished = one_token || prompt.contains("finish-in-prefill");
    // Handed off before the first token exists: even a request that ends on it goes on to
    // decode (which finishes it identically), so the descriptor is in both lines.
    if shared.spec.early && body["kv_transfer_params"]["early_descriptor"] == true {
        let lease = lease();
        let mut answer = prefill_answer(body, prompt, chat, finished);
        answer["kv_transfer_params"] = descriptor(&lease);
        return early_answer(shared.clone(), lease, answer);
    }
    let mut answer = prefill_answer(body, prompt, chat, finished);
    answer["kv_transfer_params"] = if finished { Value::Null } else { descriptor(&lease()) };
    Json(answer).into_response()
}

/// Prefill's answer: the first token `P`, final when `finished`.
fn prefill_answer(body: &Value, prompt: &str, chat: bool, finished: bool) -> Value {
    let finish = if finished { json!("length") } else { Value::Null };
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4});
    if chat {
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
    }
}

/// An early handoff's two lines: the early descriptor, then (as scripted) `answer`.
fn early_answer(shared: Arc<Shared>, lease: String, answer: Value) -> Response {
    let second = shared.early.second_lines.lock().unwrap().pop_front().unwrap_or(SecondLine::Answer);
    // Sampled at once, unless the request is to fail before its first token.
    let token = matches!(second, SecondLine::Answer | SecondLine::Never).then_some(Ok(7));
    let first_token = Arc::new(watch::Sender::new(FirstToken { asked: false, token }));
    shared.first_tokens.lock().unwrap().insert(lease.clone(), first_token.clone());
    let early = json!({"lease_id": lease, "engine": shared.spec.name, "first_token_url": format!("{}/pd/first_token", shared.url)});
    let first = json!({ "kv_transfer_params": early });
    let body = EarlyBody { shared, lease, first_token, step: 0, over: false };
    let lines = futures::stream::unfold(body, move |mut body| {
        let (first, answer) = (first.clone(), answer.clone());
        async move {
            body.step += 1;
            let line = match body.step {
                1 => {
                    body.mark(Early::FirstLine);
                    first
                }
                2 => {
                    let _ = body.shared.early.hold.subscribe().wait_for(|held| !held).await;
                    if matches!(second, SecondLine::Drop | SecondLine::Error) {
                        // Fails once decode has the descriptor (so the first line surely
                        // went out), while decode waits for the first token.
                        let _ = body.first_token.subscribe().wait_for(|t| t.asked).await;
                        body.fail_first_token("the prefill request failed before its first token");
                    }
                    match second {
                        SecondLine::Answer => answer,
                        SecondLine::Never => std::future::pending::<Value>().await,
                        SecondLine::Drop => {
                            body.end(Early::Dropped);
                            return Some((Err(std::io::Error::other("prefill died")), body));
                        }
                        SecondLine::Error => json!({"error": {"message": "prefill broke", "type": "server_error", "param": null, "code": null}}),
                    }
                }
                _ => {
                    body.end(Early::Ended);
                    return None;
                }
            };
            if body.step == 2 {
                body.mark(Early::SecondLine);
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(format!("{line}\n"))), body))
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}

/// The state of an early answer's body; dropped before its end, the router went away.
struct EarlyBody {
    shared: Arc<Shared>,
    lease: String,
    first_token: Arc<watch::Sender<FirstToken>>,
    step: usize,
    over: bool,
}

impl EarlyBody {
    fn mark(&self, state: Early) {
        self.shared.seen.early.lock().unwrap().insert(self.lease.clone(), state);
    }

    fn fail_first_token(&self, why: &str) {
        self.first_token.send_if_modified(|t| {
            let unset = t.token.is_none();
            if unset {
                t.token = Some(Err(why.into()));
            }
            unset
        });
    }

    fn end(&mut self, state: Early) {
        if !std::mem::replace(&mut self.over, true) {
            self.mark(state);
        }
    }
}

impl Drop for EarlyBody {
    fn drop(&mut self) {
        if !self.over {
            self.mark(Early::Aborted);
        }
        self.fail_first_token("the prefill request was aborted before its first token");
    }
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
