//! Sends a validated request to a worker (or a prefill/decode pair) and brings the answer
//! back.
//!
//! [`plan`] decides the route: whole on one worker, or split over a prefill and a decode
//! worker ([`split`]). Whole: up to `1 + max_retries` attempts, each on a worker not tried
//! yet for this request: an attempt is retried when the connection fails, the worker
//! answers 5xx, or a stream breaks before its first byte reached the client. Once bytes
//! have gone to the client the answer is committed to that worker; a later failure becomes
//! an SSE error event (see [`relay`]). Every wait is bounded by the request deadline,
//! streams also by the idle timeout.

mod attempt;
mod lease;
mod plan;
mod relay;
mod split;
mod synth;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use crate::api_error::ApiError;
use crate::gateway::inspect::{Endpoint, RequestFacts};
use crate::metrics::{DecisionLabels, Metrics};
use crate::policy::{Policy, RouteRequest};
use crate::workers::{Admission, Worker, WorkerId, WorkerPool};
use attempt::Attempt;
use plan::Route;
use relay::Relay;
pub use split::PREFILL_WORKER_HEADER;

/// Header naming the worker that served a response (instance id), for clients and tests;
/// the decode worker of a split request.
pub const WORKER_HEADER: &str = "x-dlengine-worker";
/// Largest 5xx body kept to pass on when every attempt failed.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// At most one warning per this many seconds about requests that could not be split.
const PAIRING_WARNING_EVERY_SECS: u64 = 10;

#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    pub max_retries: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
}

pub struct Proxy {
    client: reqwest::Client,
    pool: Arc<WorkerPool>,
    policy: Arc<dyn Policy>,
    metrics: Arc<Metrics>,
    settings: ProxySettings,
    started: std::time::Instant,
    /// Seconds after `started` (plus one) of the last pairing warning; 0: none yet.
    last_pairing_warning: AtomicU64,
}

/// Why an attempt did not produce an answer.
enum AttemptError {
    /// Retry elsewhere.
    Retryable { kind: &'static str, message: String },
    /// A worker's own 5xx answer: retry elsewhere, and pass it on if it was the last.
    ServerError { status: StatusCode, body: Bytes },
    /// A decode worker's 5xx `kv_transfer_failed`: it could not pull the prefill worker's
    /// KV, which is held against prefill (split.rs), not against it. Otherwise as ServerError.
    KvTransfer { status: StatusCode, body: Bytes },
    /// The request deadline passed: no time left for another attempt.
    Deadline,
}

/// One request's path through the retries.
struct Routing<'a> {
    facts: &'a RequestFacts,
    session_key: Option<&'a str>,
    tried: Vec<WorkerId>,
}

impl Proxy {
    pub fn new(pool: Arc<WorkerPool>, policy: Arc<dyn Policy>, metrics: Arc<Metrics>, settings: ProxySettings) -> Proxy {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(512)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Proxy { client, pool, policy, metrics, settings, started: std::time::Instant::now(), last_pairing_warning: AtomicU64::new(0) }
    }

    pub async fn forward(&self, endpoint: Endpoint, facts: &RequestFacts, body: Bytes, session_key: Option<&str>) -> Response {
        let plan = plan::plan(&self.pool.snapshot(), &facts.model, facts.single_sequence);
        if let Some(reason) = plan.pairing_failure {
            self.note_pairing_failure(&facts.model, reason);
        }
        let whole = match plan.route {
            Route::Refuse(error) => return error.into_response(),
            Route::Split { prefill, decode, whole } => {
                if whole.is_empty() || split::pair_available(&prefill, &decode) {
                    return self.forward_split(endpoint, facts, &prefill, &decode, &body, session_key).await;
                }
                self.note_pairing_failure(&facts.model, "no_available_pair");
                whole
            }
            Route::Whole(workers) => workers,
        };
        let body = if facts.has_kv_transfer_params { without_kv_transfer_params(body) } else { body };
        self.forward_whole(endpoint, facts, &whole, body, session_key).await
    }

    /// A model with prefill workers whose requests cannot be split: counted every time,
    /// logged at most every few seconds.
    fn note_pairing_failure(&self, model: &str, reason: &'static str) {
        self.metrics.pairing_failure(reason);
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_pairing_warning.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + PAIRING_WARNING_EVERY_SECS;
        if due && self.last_pairing_warning.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(model, reason, "model has prefill workers but requests cannot be split; serving them whole");
        } else {
            tracing::debug!(model, reason, "request not split");
        }
    }

    async fn forward_whole(
        &self,
        endpoint: Endpoint,
        facts: &RequestFacts,
        workers: &[Arc<Worker>],
        body: Bytes,
        session_key: Option<&str>,
    ) -> Response {
        let deadline = Instant::now() + self.settings.request_timeout;
        let mut routing = Routing { facts, session_key, tried: Vec::new() };
        let mut last_error = None;
        for attempt_number in 0..=self.settings.max_retries {
            let Some((worker, admission)) = self.pick(workers, &routing) else { break };
            if attempt_number > 0 {
                self.metrics.retries.inc();
            }
            routing.tried.push(worker.id);
            let attempt = Attempt::begin(worker, admission, self.metrics.clone());
            match self.try_worker(attempt, endpoint, &body, facts.stream, deadline).await {
                Ok(response) => return response,
                Err(error) => {
                    let deadline_passed = matches!(error, AttemptError::Deadline);
                    last_error = Some(error);
                    if deadline_passed {
                        break;
                    }
                }
            }
        }
        give_up(&facts.model, last_error)
    }

    /// The policy's choice among workers not yet tried whose breakers let a request through.
    fn pick(&self, workers: &[Arc<Worker>], routing: &Routing<'_>) -> Option<(Arc<Worker>, Admission)> {
        let now = std::time::Instant::now();
        let candidates: Vec<Arc<Worker>> = workers
            .iter()
            .filter(|w| !routing.tried.contains(&w.id) && w.breaker.is_available(now))
            .cloned()
            .collect();
        let request = RouteRequest { text: &routing.facts.text, session_key: routing.session_key };
        self.choose(&*self.policy, candidates, &request, true)
    }

    /// `policy`'s choice among `candidates`, admitted by its breaker; `count` records the
    /// decision in the routing-decisions metric.
    fn choose(
        &self,
        policy: &dyn Policy,
        mut candidates: Vec<Arc<Worker>>,
        request: &RouteRequest<'_>,
        count: bool,
    ) -> Option<(Arc<Worker>, Admission)> {
        let now = std::time::Instant::now();
        while !candidates.is_empty() {
            let decision = policy.choose(&candidates, request);
            if let Some(admission) = decision.worker.breaker.admit(now) {
                if count {
                    let labels = DecisionLabels { policy: policy.name(), reason: decision.reason };
                    self.metrics.decisions.get_or_create(&labels).inc();
                }
                return Some((decision.worker, admission));
            }
            // Another request took the probe slot meanwhile.
            candidates.retain(|w| w.id != decision.worker.id);
        }
        None
    }

    async fn try_worker(
        &self,
        attempt: Attempt,
        endpoint: Endpoint,
        body: &Bytes,
        stream: bool,
        deadline: Instant,
    ) -> Result<Response, AttemptError> {
        let (attempt, upstream) = self.send(attempt, endpoint, body, deadline).await?;
        let status = upstream.status();
        if stream && status.is_success() && is_event_stream(&upstream) {
            return self.start_stream(attempt, upstream, deadline).await;
        }
        self.buffer_whole(attempt, upstream, deadline).await
    }

    /// Non-streaming answers are small: read all of it, so a worker dying halfway is a
    /// retryable failure instead of a truncated body.
    async fn buffer_whole(&self, mut attempt: Attempt, upstream: reqwest::Response, deadline: Instant) -> Result<Response, AttemptError> {
        let status = upstream.status();
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let body = match tokio::time::timeout_at(deadline, upstream.bytes()).await {
            Err(_) => return Err(self.fail(attempt, "timeout", AttemptError::Deadline)),
            Ok(Err(error)) => return Err(self.fail(attempt, "stream", retryable("stream", error.to_string()))),
            Ok(Ok(body)) => body,
        };
        attempt.succeed();
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        if let Some(content_type) = content_type {
            response.headers_mut().insert(header::CONTENT_TYPE, content_type);
        }
        name_worker(&mut response, attempt.worker());
        Ok(response)
    }

    /// Waits for the first chunk (still retryable), then commits to this worker.
    async fn start_stream(&self, attempt: Attempt, upstream: reqwest::Response, deadline: Instant) -> Result<Response, AttemptError> {
        let mut chunks = upstream.bytes_stream().boxed();
        let first_by = deadline.min(Instant::now() + self.settings.idle_timeout);
        let first = match tokio::time::timeout_at(first_by, chunks.next()).await {
            Ok(Some(Ok(first))) => first,
            Ok(Some(Err(error))) => return Err(self.fail(attempt, "stream", retryable("stream", error.to_string()))),
            Ok(None) => return Err(self.fail(attempt, "stream", retryable("stream", "empty stream".into()))),
            Err(_) if Instant::now() >= deadline => return Err(self.fail(attempt, "timeout", AttemptError::Deadline)),
            Err(_) => return Err(self.fail(attempt, "timeout", retryable("timeout", "no first byte within the idle timeout".into()))),
        };
        let worker = attempt.worker().clone();
        let relay = Relay::new(first, chunks, attempt, self.settings.idle_timeout, deadline);
        let mut response = Response::new(Body::from_stream(relay.into_stream()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        name_worker(&mut response, &worker);
        Ok(response)
    }

    /// POSTs `body` to the attempt's worker; a connection failure, the deadline or a 5xx
    /// answer fails the attempt (retryable), anything else is the caller's to read.
    async fn send(&self, attempt: Attempt, endpoint: Endpoint, body: &Bytes, deadline: Instant) -> Result<(Attempt, reqwest::Response), AttemptError> {
        let url = format!("{}{}", attempt.worker().url(), endpoint.path());
        let send = self.client.post(url).header(header::CONTENT_TYPE, "application/json").body(body.clone()).send();
        let upstream = match tokio::time::timeout_at(deadline, send).await {
            Err(_) => return Err(self.fail(attempt, "timeout", AttemptError::Deadline)),
            Ok(Err(error)) => return Err(self.fail(attempt, "connect", retryable("connect", error.to_string()))),
            Ok(Ok(upstream)) => upstream,
        };
        let status = upstream.status();
        if status.is_server_error() {
            let body = read_bounded(upstream, deadline).await;
            if attempt.imports_kv() && is_kv_transfer_failure(&body) {
                // No verdict on this worker: the caller settles the prefill worker's.
                let error = AttemptError::KvTransfer { status, body };
                self.log_failure(attempt.worker(), &error);
                return Err(error);
            }
            return Err(self.fail(attempt, "status_5xx", AttemptError::ServerError { status, body }));
        }
        Ok((attempt, upstream))
    }

    fn fail(&self, mut attempt: Attempt, kind: &'static str, error: AttemptError) -> AttemptError {
        self.log_failure(attempt.worker(), &error);
        attempt.fail(kind);
        error
    }

    fn log_failure(&self, worker: &Worker, error: &AttemptError) {
        match error {
            AttemptError::Retryable { kind, message } => tracing::warn!(worker = %worker.url(), kind, "attempt failed: {message}"),
            AttemptError::ServerError { status, .. } => tracing::warn!(worker = %worker.url(), %status, "attempt failed"),
            AttemptError::KvTransfer { status, .. } => {
                tracing::warn!(worker = %worker.url(), %status, "attempt failed: the decode worker could not pull the prefill worker's KV")
            }
            AttemptError::Deadline => tracing::warn!(worker = %worker.url(), "request deadline passed"),
        }
    }
}

/// The body without a client's own `kv_transfer_params`: only the router hands engines
/// migration descriptors.
fn without_kv_transfer_params(body: Bytes) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.remove("kv_transfer_params");
            Bytes::from(serde_json::Value::Object(object).to_string())
        }
        _ => body,
    }
}

fn retryable(kind: &'static str, message: String) -> AttemptError {
    AttemptError::Retryable { kind, message }
}

/// Whether a 5xx body is the engines' `kv_transfer_failed` error.
fn is_kv_transfer_failure(body: &Bytes) -> bool {
    let code = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    code.as_deref() == Some("kv_transfer_failed")
}

fn is_event_stream(upstream: &reqwest::Response) -> bool {
    upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn name_worker(response: &mut Response, worker: &Worker) {
    if let Ok(value) = HeaderValue::from_str(&worker.record.instance_id) {
        response.headers_mut().insert(WORKER_HEADER, value);
    }
}

async fn read_bounded(upstream: reqwest::Response, deadline: Instant) -> Bytes {
    let read = async {
        let mut body = Vec::new();
        let mut chunks = upstream.bytes_stream();
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        Bytes::from(body)
    };
    let by = deadline.min(Instant::now() + Duration::from_secs(2));
    tokio::time::timeout_at(by, read).await.unwrap_or_default()
}

/// The answer when no attempt succeeded.
fn give_up(model: &str, last_error: Option<AttemptError>) -> Response {
    match last_error {
        None => ApiError::no_worker(format!("No worker for model `{model}` can take a request right now (all are failing).")).into_response(),
        Some(AttemptError::Deadline) => ApiError::gateway_timeout("The request exceeded the router's request timeout.").into_response(),
        Some(AttemptError::Retryable { message, .. }) => ApiError::bad_gateway(format!("Every attempt failed; the last: {message}")).into_response(),
        Some(AttemptError::ServerError { status, body } | AttemptError::KvTransfer { status, body })
            if serde_json::from_slice::<serde_json::Value>(&body).is_ok() =>
        {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Some(AttemptError::ServerError { status, .. } | AttemptError::KvTransfer { status, .. }) => {
            ApiError::bad_gateway(format!("Every attempt failed; the last worker answered {status}.")).into_response()
        }
    }
}
