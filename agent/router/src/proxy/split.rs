//! A request split over two engines: prefill computes the prompt's KV and the first token,
//! decode pulls that KV and generates the rest.
//!
//! 1. Prefill (chosen by the policy; cache-aware prefix matching pays off here) gets the
//!    request with `"stream": false`, no `stream_options`, and
//!    `"kv_transfer_params": {"do_remote_decode": true, "early_descriptor": true}`.
//! 2. Its answer's `kv_transfer_params` is null when prefill finished the request alone:
//!    that answer goes to the client (as a synthesized SSE stream if it asked for one).
//! 3. Otherwise it is the migration descriptor: decode (least loaded among the prefill
//!    worker's partners) gets the client's request plus that descriptor, and its answer is
//!    relayed like any worker's.
//!
//! An engine that honours `early_descriptor` answers in JSON lines: the descriptor first,
//! as soon as the prompt's last forward is under way, then its own answer. Decode starts
//! at once (it reads the KV while prefill still computes it and fetches the first token
//! from prefill), so the decode hop overlaps prefill's compute. Prefill's second line is
//! drained in the background (dropping the connection would abort prefill's request). A
//! request that ends on its first token by EOS or a stop string is then finished by
//! decode, identically; one that asks for a single token is not sent early.
//!
//! A failed prefill hop (connect error, 5xx, timeout) is retried on another prefill worker;
//! a failed decode hop (connect error, 5xx such as `kv_transfer_failed`, a stream that
//! breaks before its first byte) releases the prefill lease and redoes the whole pair,
//! preferring workers not yet used. Every attempt, prefill or pair, counts against
//! `max_retries`, and every hop against the request deadline.
//!
//! Circuit breakers: a prefill hop that hands off is settled only once decode has answered,
//! since only then is it known whether its KV could be pulled. Decode's 503
//! `kv_transfer_failed` counts as a failure of the prefill worker, not of decode; any other
//! answer of decode (its own failures included) as a success of prefill; a deadline passing,
//! or no decode worker to try, as neither. The prefill worker stays a candidate for the
//! pair's retry (it may be the only one).

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::attempt::{Attempt, Verdict};
use super::lease::Lease;
use super::plan::compatible;
use super::{give_up, name_worker, retryable, synth, AttemptError, Proxy};
use crate::api_error::ApiError;
use crate::gateway::inspect::{Endpoint, RequestFacts};
use crate::policy::{LeastLoad, RouteRequest};
use crate::workers::{Admission, Worker, WorkerId};

/// Header naming the prefill worker of a split request (instance id).
pub const PREFILL_WORKER_HEADER: &str = "x-dlengine-prefill-worker";

/// What a prefill hop produced.
enum PrefillOutcome {
    /// Prefill finished the request itself: its answer, descriptor field removed.
    Finished(Value),
    /// Continue on a decode worker with this descriptor; prefill's verdict waits for
    /// decode's answer.
    Handoff(Value, Verdict),
    /// Continue on a decode worker with this early descriptor while prefill's answer
    /// (its second line) is still to come.
    Early(Value, reqwest::Response, Verdict),
    /// The engine refused the request (4xx): the client's answer as it is.
    Refused(Response),
}

/// Workers used so far by one split request.
#[derive(Default)]
struct Used {
    prefill: Vec<WorkerId>,
    /// Prefill workers whose own hop failed: not tried again for this request.
    failed_prefill: Vec<WorkerId>,
    decode: Vec<WorkerId>,
}

/// Whether some prefill worker and a partner of it are both let through by their breakers.
pub fn pair_available(prefill: &[Arc<Worker>], decode: &[Arc<Worker>]) -> bool {
    let now = std::time::Instant::now();
    prefill
        .iter()
        .filter(|p| p.breaker.is_available(now))
        .any(|p| decode.iter().any(|d| compatible(p, d) && d.breaker.is_available(now)))
}

/// Keeps only workers not used yet, unless every candidate has been.
fn prefer_unused(candidates: &mut Vec<Arc<Worker>>, used: &[WorkerId]) {
    if candidates.iter().any(|w| !used.contains(&w.id)) {
        candidates.retain(|w| !used.contains(&w.id));
    }
}

impl Proxy {
    pub(super) async fn forward_split(
        &self,
        endpoint: Endpoint,
        facts: &RequestFacts,
        prefill: &[Arc<Worker>],
        decode: &[Arc<Worker>],
        body: &Bytes,
        session_key: Option<&str>,
    ) -> Response {
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
            return ApiError::invalid_request("The request body must be a JSON object.", None).into_response();
        };
        let include_usage = request.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool) == Some(true);
        let prefill_body = prefill_request(&request);
        self.metrics.pd_requests.inc();
        let deadline = Instant::now() + self.settings.request_timeout;
        let route_request = RouteRequest { text: &facts.text, session_key };
        let mut used = Used::default();
        let mut last_error = None;
        for attempt_number in 0..=self.settings.max_retries {
            let Some((prefill_worker, admission)) = self.pick_prefill(prefill, decode, &used, &route_request) else { break };
            if attempt_number > 0 {
                self.metrics.retries.inc();
                self.metrics.pd_retries.inc();
            }
            used.prefill.push(prefill_worker.id);
            let attempt = Attempt::begin(prefill_worker.clone(), admission, self.metrics.clone());
            let mut prefill_rest = None;
            let (descriptor, prefill_verdict) = match self.prefill_hop(attempt, endpoint, &prefill_body, deadline).await {
                Ok(PrefillOutcome::Handoff(descriptor, verdict)) => (descriptor, verdict),
                Ok(PrefillOutcome::Early(descriptor, rest, verdict)) => {
                    prefill_rest = Some(PrefillRest::drain(rest, deadline));
                    (descriptor, verdict)
                }
                Ok(PrefillOutcome::Finished(answer)) => {
                    self.metrics.pd_prefill_finished.inc();
                    return finished_answer(endpoint, &answer, facts.stream, include_usage, &prefill_worker);
                }
                Ok(PrefillOutcome::Refused(response)) => return response,
                Err(error) => {
                    used.failed_prefill.push(prefill_worker.id);
                    let deadline_passed = matches!(error, AttemptError::Deadline);
                    last_error = Some(error);
                    if deadline_passed {
                        break;
                    }
                    continue;
                }
            };
            // From here until decode takes over, dropping this (a failed hop, the deadline,
            // the client going away) releases the prefill engine's blocks.
            let lease = match descriptor.get("lease_id").and_then(Value::as_str) {
                Some(id) => Some(Lease::new(self.client.clone(), prefill_worker.url(), id.to_string(), self.metrics.clone())),
                None => {
                    tracing::warn!(worker = %prefill_worker.url(), "prefill descriptor has no lease_id; its blocks wait for lease expiry");
                    None
                }
            };
            let Some((decode_worker, admission)) = self.pick_decode(&prefill_worker, decode, &used) else {
                last_error = Some(retryable("no_decode", "no decode worker paired with the prefill worker could take the request".into()));
                continue;
            };
            used.decode.push(decode_worker.id);
            let decode_body = decode_request(request.clone(), descriptor);
            let attempt = Attempt::begin(decode_worker, admission, self.metrics.clone()).importing_kv();
            match self.try_worker(attempt, endpoint, &decode_body, facts.stream, deadline).await {
                Ok(response) => {
                    prefill_verdict.succeed();
                    if let Some(rest) = prefill_rest.filter(|_| response.status().is_success()) {
                        rest.detach();
                    }
                    return self.decode_answered(response, lease, &prefill_worker).await;
                }
                Err(error) => {
                    drop(prefill_rest);
                    drop(lease);
                    match error {
                        AttemptError::KvTransfer { .. } => prefill_verdict.fail("kv_transfer"),
                        AttemptError::Deadline => drop(prefill_verdict),
                        AttemptError::Retryable { .. } | AttemptError::ServerError { .. } => prefill_verdict.succeed(),
                    }
                    let deadline_passed = matches!(error, AttemptError::Deadline);
                    last_error = Some(error);
                    if deadline_passed {
                        break;
                    }
                }
            }
        }
        let mut response = give_up(&facts.model, last_error);
        if response.status() == StatusCode::SERVICE_UNAVAILABLE && response.headers().get(header::RETRY_AFTER).is_none() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        response
    }

    /// The policy's choice among prefill workers that have not failed this request and have
    /// a partner decode worker that can take it, preferring workers not used yet.
    fn pick_prefill(
        &self,
        prefill: &[Arc<Worker>],
        decode: &[Arc<Worker>],
        used: &Used,
        request: &RouteRequest<'_>,
    ) -> Option<(Arc<Worker>, Admission)> {
        let now = std::time::Instant::now();
        let mut candidates: Vec<Arc<Worker>> = prefill
            .iter()
            .filter(|p| !used.failed_prefill.contains(&p.id) && p.breaker.is_available(now))
            .filter(|p| decode.iter().any(|d| compatible(p, d) && d.breaker.is_available(now)))
            .cloned()
            .collect();
        prefer_unused(&mut candidates, &used.prefill);
        self.choose(&*self.policy, candidates, request, true)
    }

    /// The less loaded of the prefill worker's partners, preferring those not used yet.
    fn pick_decode(&self, prefill: &Worker, decode: &[Arc<Worker>], used: &Used) -> Option<(Arc<Worker>, Admission)> {
        let now = std::time::Instant::now();
        let mut candidates: Vec<Arc<Worker>> =
            decode.iter().filter(|d| compatible(prefill, d) && d.breaker.is_available(now)).cloned().collect();
        prefer_unused(&mut candidates, &used.decode);
        self.choose(&LeastLoad, candidates, &RouteRequest::default(), false)
    }

    async fn prefill_hop(&self, attempt: Attempt, endpoint: Endpoint, body: &Bytes, deadline: Instant) -> Result<PrefillOutcome, AttemptError> {
        let (mut attempt, mut upstream) = self.send(attempt, endpoint, body, deadline).await?;
        let status = upstream.status();
        if status.is_success() && is_json_lines(&upstream) {
            return match tokio::time::timeout_at(deadline, first_line(&mut upstream)).await {
                Err(_) => Err(self.fail(attempt, "timeout", AttemptError::Deadline)),
                Ok(Some(descriptor)) => Ok(PrefillOutcome::Early(descriptor, upstream, attempt.defer())),
                Ok(None) => {
                    let message = "the prefill worker's first line is not {\"kv_transfer_params\": <descriptor>}".to_string();
                    Err(self.fail(attempt, "invalid_response", retryable("invalid_response", message)))
                }
            };
        }
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = match tokio::time::timeout_at(deadline, upstream.bytes()).await {
            Err(_) => return Err(self.fail(attempt, "timeout", AttemptError::Deadline)),
            Ok(Err(error)) => return Err(self.fail(attempt, "stream", retryable("stream", error.to_string()))),
            Ok(Ok(bytes)) => bytes,
        };
        if !status.is_success() {
            attempt.succeed();
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            if let Some(content_type) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, content_type);
            }
            name_worker(&mut response, attempt.worker());
            name_prefill(&mut response, attempt.worker());
            return Ok(PrefillOutcome::Refused(response));
        }
        let mut answer = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(answer)) => answer,
            _ => return Err(self.invalid_prefill_answer(attempt)),
        };
        match answer.remove("kv_transfer_params") {
            // An engine that ignored the field answered the whole request.
            None | Some(Value::Null) => {
                attempt.succeed();
                Ok(PrefillOutcome::Finished(Value::Object(answer)))
            }
            Some(descriptor @ Value::Object(_)) => Ok(PrefillOutcome::Handoff(descriptor, attempt.defer())),
            Some(_) => Err(self.invalid_prefill_answer(attempt)),
        }
    }

    fn invalid_prefill_answer(&self, attempt: Attempt) -> AttemptError {
        let message = "the prefill worker's answer is not a JSON object with a null or object `kv_transfer_params`".to_string();
        self.fail(attempt, "invalid_response", retryable("invalid_response", message))
    }

    /// Decode answered (a stream already under way, or a whole answer). On success decode
    /// owns the KV now; otherwise the lease is released as it drops here.
    async fn decode_answered(&self, response: Response, lease: Option<Lease>, prefill: &Worker) -> Response {
        let mut response = if response.status().is_success() {
            if let Some(lease) = lease {
                lease.handed_over();
            }
            response
        } else {
            drop(lease);
            self.note_decode_refusal(response).await
        };
        name_prefill(&mut response, prefill);
        response
    }

    /// A decode worker's 4xx goes to the client as it is; `kv_layout_mismatch` means the
    /// pairing was wrong (it never should be), so it is counted and logged as such.
    async fn note_decode_refusal(&self, response: Response) -> Response {
        if response.status() != StatusCode::BAD_REQUEST {
            return response;
        }
        let (parts, body) = response.into_parts();
        // A whole answer already buffered in memory.
        let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
        let code = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string));
        if code.as_deref() == Some("kv_layout_mismatch") {
            self.metrics.pairing_failure("kv_layout_mismatch");
            let worker = parts.headers.get(super::WORKER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?");
            tracing::error!(decode = worker, "decode worker refused a pair as mismatched: {}", String::from_utf8_lossy(&bytes));
        }
        Response::from_parts(parts, Body::from(bytes))
    }
}

/// The client's request for prefill: not streamed, asking to keep the KV for a decode
/// engine and to say where it will be as early as it can.
fn prefill_request(request: &Map<String, Value>) -> Bytes {
    let mut body = request.clone();
    body.insert("stream".into(), Value::Bool(false));
    body.remove("stream_options");
    // One token is all prefill computes: answered by prefill alone, no decode hop to start early.
    let one_token = ["max_tokens", "max_completion_tokens"].iter().any(|f| request.get(*f).and_then(Value::as_u64) == Some(1));
    body.insert("kv_transfer_params".into(), json!({"do_remote_decode": true, "early_descriptor": !one_token}));
    Bytes::from(Value::Object(body).to_string())
}

fn is_json_lines(response: &reqwest::Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/x-ndjson"))
}

/// Reads an early answer's first line: `{"kv_transfer_params": <descriptor object>}`.
async fn first_line(upstream: &mut reqwest::Response) -> Option<Value> {
    let mut line = Vec::new();
    while !line.contains(&b'\n') {
        line.extend_from_slice(&upstream.chunk().await.ok()??);
        if line.len() > MAX_DESCRIPTOR_LINE {
            return None;
        }
    }
    // Whatever came after the newline belongs to the second line, which is drained unread.
    let end = line.iter().position(|&b| b == b'\n')?;
    let mut first: Value = serde_json::from_slice(&line[..end]).ok()?;
    Some(first.get_mut("kv_transfer_params").filter(|d| d.is_object())?.take())
}

/// Longest first line of an early answer accepted (a descriptor is a few KiB).
const MAX_DESCRIPTOR_LINE: usize = 1 << 20;

/// The rest of an early prefill answer, read to its end in the background so prefill's
/// request is not aborted; dropping this before [`detach`](Self::detach) aborts it (the
/// pair failed: prefill's request may as well stop).
struct PrefillRest(Option<tokio::task::JoinHandle<()>>);

impl PrefillRest {
    fn drain(mut upstream: reqwest::Response, deadline: Instant) -> Self {
        Self(Some(tokio::spawn(async move {
            let _ = tokio::time::timeout_at(deadline, async { while let Ok(Some(_)) = upstream.chunk().await {} }).await;
        })))
    }

    /// Decode took over: let the drain finish on its own.
    fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for PrefillRest {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The client's request for decode, as the client sent it plus the descriptor.
fn decode_request(mut request: Map<String, Value>, descriptor: Value) -> Bytes {
    request.insert("kv_transfer_params".into(), descriptor);
    Bytes::from(Value::Object(request).to_string())
}

/// Prefill's own final answer, as JSON or as the stream the client asked for.
fn finished_answer(endpoint: Endpoint, answer: &Value, stream: bool, include_usage: bool, prefill: &Worker) -> Response {
    let mut response = if stream {
        let mut response = Response::new(Body::from(synth::stream_from_answer(endpoint, answer, include_usage)));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    } else {
        let mut response = Response::new(Body::from(answer.to_string()));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    name_worker(&mut response, prefill);
    name_prefill(&mut response, prefill);
    response
}

fn name_prefill(response: &mut Response, worker: &Worker) {
    if let Ok(value) = HeaderValue::from_str(&worker.record.instance_id) {
        response.headers_mut().insert(PREFILL_WORKER_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_gets_a_non_streaming_request_for_remote_decode() {
        let request = json!({"model": "m", "prompt": "p", "stream": true, "stream_options": {"include_usage": true},
            "kv_transfer_params": {"lease_id": "forged"}});
        let Value::Object(request) = request else { unreachable!() };
        let body: Value = serde_json::from_slice(&prefill_request(&request)).unwrap();
        assert_eq!(body["stream"], false);
        assert!(body.get("stream_options").is_none());
        assert_eq!(body["kv_transfer_params"], json!({"do_remote_decode": true, "early_descriptor": true}));
        let Value::Object(one) = json!({"model": "m", "prompt": "p", "max_tokens": 1}) else { unreachable!() };
        let body: Value = serde_json::from_slice(&prefill_request(&one)).unwrap();
        assert_eq!(body["kv_transfer_params"]["early_descriptor"], false, "a one-token answer is prefill's alone");
        let body: Value = serde_json::from_slice(&decode_request(request, json!({"lease_id": "l1"}))).unwrap();
        assert_eq!((body["stream"].as_bool(), body["stream_options"]["include_usage"].as_bool()), (Some(true), Some(true)));
        assert_eq!(body["kv_transfer_params"], json!({"lease_id": "l1"}));
    }
}
