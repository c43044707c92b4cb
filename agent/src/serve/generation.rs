//! The engine output of one HTTP request: one engine stream per prompt (a batched
//! completions request has several), merged, timed, and held in flight until answered.
//! Dropping it drops the engine streams, which aborts their requests and frees their KV
//! blocks: that is what happens when a client disconnects mid-stream.

use dlengine_engine::engine::RequestStream;
use dlengine_engine::error::EngineError;
use dlengine_engine::kv_transfer::EarlyKv;
use dlengine_engine::request::{ChoiceDelta, TokenLogprob};
use futures::stream::{BoxStream, SelectAll};
use futures::StreamExt;

use super::engine_errors::engine_error;
use super::in_flight::InFlightGuard;
use super::metrics::RequestObserver;
use super::pd::{transfer_failed, Handoff, LeaseRelease};
use crate::openai::usage::Usage;
use crate::openai::ApiError;

/// What the merged output yields.
#[derive(Debug)]
pub enum Event {
    /// New output of one choice of prompt `source`.
    Delta { source: usize, delta: ChoiceDelta },
    /// The engine failed the request; nothing more follows.
    Failed(EngineError),
    /// Prefill with an early handoff: the lease and blocks, before the first token.
    KvReady(EarlyKv),
}

enum SourceEvent {
    Delta(usize, ChoiceDelta),
    Done(dlengine_engine::request::Usage),
    Failed(EngineError),
}

pub struct Generation {
    sources: SelectAll<BoxStream<'static, SourceEvent>>,
    usage: Usage,
    observer: RequestObserver,
    /// Prefill: the KV a request handed off (taken out of its delta).
    handoff: Option<Handoff>,
    /// Decode: prefill's lease, released once the engine imported the KV (its first
    /// event) or when this is dropped.
    lease: Option<LeaseRelease>,
    /// An event read ahead by [`await_import`](Self::await_import), yielded next.
    peeked: Option<Option<Event>>,
    _in_flight: InFlightGuard,
}

impl Generation {
    pub fn new(streams: Vec<RequestStream>, tracking: (InFlightGuard, RequestObserver)) -> Self {
        let sources = futures::stream::select_all(streams.into_iter().enumerate().map(|(i, s)| source(i, s)));
        let (in_flight, observer) = tracking;
        Self { sources, usage: Usage::new(0, 0, 0), observer, handoff: None, lease: None, peeked: None, _in_flight: in_flight }
    }

    /// Decode: holds prefill's lease and waits for the engine's first event, which comes
    /// once the KV is imported. A failed import is a 503 `kv_transfer_failed` before any
    /// byte of the answer, streamed or not, so the router can retry on another pair.
    pub async fn await_import(&mut self, lease: LeaseRelease) -> Result<(), ApiError> {
        self.lease = Some(lease);
        match self.next().await {
            Some(Event::Failed(EngineError::Request(why))) => Err(transfer_failed(why)),
            Some(Event::Failed(e)) => Err(transfer_failed(e.to_string())),
            first => {
                self.peeked = Some(first);
                Ok(())
            }
        }
    }

    /// The KV handoff of a prefill request, once its delta went by.
    pub fn take_handoff(&mut self) -> Option<Handoff> {
        self.handoff.take()
    }

    fn capture_handoff(&mut self, delta: &mut ChoiceDelta) {
        let Some(kv) = delta.kv_handoff.take() else { return };
        let first_token = delta.logprobs.first().cloned();
        let first_token = match (first_token, delta.token_ids.first()) {
            (Some(t), _) => t,
            (None, Some(&token_id)) => TokenLogprob { token_id, logprob: 0.0, top: Vec::new() },
            (None, None) => return,
        };
        let finished = delta.stop_reason.is_some();
        self.handoff = Some(Handoff { kv, first_token, finished });
    }

    /// The next delta; None once every prompt's choices have finished.
    pub async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.peeked.take() {
            return event;
        }
        loop {
            let event = self.sources.next().await;
            // The engine has imported the KV by its first event: dropping releases the lease.
            drop(self.lease.take());
            match event {
                Some(SourceEvent::Delta(_, ChoiceDelta { kv_ready: Some(kv), .. })) => return Some(Event::KvReady(kv)),
                Some(SourceEvent::Delta(source, mut delta)) => {
                    self.observer.on_tokens(delta.token_ids.len());
                    self.capture_handoff(&mut delta);
                    return Some(Event::Delta { source, delta });
                }
                Some(SourceEvent::Done(usage)) => self.add_usage(usage),
                Some(SourceEvent::Failed(e)) => return Some(Event::Failed(e)),
                None => {
                    self.observer.on_finish(self.usage.prompt_tokens, self.usage.completion_tokens);
                    return None;
                }
            }
        }
    }

    /// Token counts of the prompts that finished (all of them once `next` gave None).
    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn add_usage(&mut self, u: dlengine_engine::request::Usage) {
        let cached = self.usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens) + u.cached_tokens;
        self.usage = Usage::new(self.usage.prompt_tokens + u.prompt_tokens, self.usage.completion_tokens + u.completion_tokens, cached);
    }
}

/// One engine stream as a `Stream` that ends with its usage (or its failure).
fn source(index: usize, stream: RequestStream) -> BoxStream<'static, SourceEvent> {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match stream.next().await {
            Some(Ok(delta)) => Some((SourceEvent::Delta(index, delta), Some(stream))),
            Some(Err(e)) => Some((SourceEvent::Failed(e), None)),
            None => Some((SourceEvent::Done(stream.usage()), None)),
        }
    })
    .boxed()
}

/// Builds a non-streamed answer from deltas.
pub trait Collector {
    type Output;
    fn add(&mut self, source: usize, delta: ChoiceDelta);
    fn finish(self, usage: Usage) -> Self::Output;
}

/// Runs a generation to its end into one answer (or the engine's failure as a 500).
pub async fn collect<C: Collector>(generation: &mut Generation, mut collector: C) -> Result<C::Output, ApiError> {
    while let Some(event) = generation.next().await {
        match event {
            Event::Delta { source, delta } => collector.add(source, delta),
            Event::Failed(e) => return Err(engine_error(&e)),
            Event::KvReady(_) => {}
        }
    }
    Ok(collector.finish(generation.usage()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use dlengine_engine::backend::cpu::CpuBackend;
    use dlengine_engine::config::EngineConfig;
    use dlengine_engine::engine::Engine;
    use dlengine_engine::kv_transfer::{ImportedKv, KvSource, KvTransfer, StreamedKv};
    use dlengine_engine::request::{GenerateRequest, TokenLogprob};
    use dlengine_engine::sampling_params::SamplingParams;

    use super::*;
    use crate::serve::in_flight::InFlight;
    use crate::serve::metrics::Metrics;

    /// A prefill stand-in's `POST /pd/free`: the lease ids it was sent.
    async fn free_endpoint() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (freed, rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/pd/free",
            post(move |Json(body): Json<serde_json::Value>| {
                let _ = freed.send(body["lease_id"].as_str().unwrap_or_default().to_owned());
                async {}
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/pd/free", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, rx)
    }

    /// The engine admits the import, then fails it (as a failed CUDA IPC copy or RDMA READ
    /// would; here, a lease of the wrong size): decode answers 503 before any byte, so
    /// the router re-prefills elsewhere, and prefill's lease is released.
    #[tokio::test]
    async fn an_import_the_engine_fails_is_a_503_kv_transfer_failed_and_releases_the_lease() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3-tiny");
        let engine = Engine::start(&dir, EngineConfig::default(), CpuBackend::new(64 << 20)).unwrap();
        let (free_url, mut freed) = free_endpoint().await;
        let first_token = Some(TokenLogprob { token_id: 5, logprob: 0.0, top: Vec::new() });
        let source = KvSource::Streamed(Arc::new(StreamedKv::new(2, "tcp")));
        let params = SamplingParams { max_tokens: 4, ..SamplingParams::default() };
        let kv_transfer = KvTransfer::Import(ImportedKv { first_token, source });
        let stream = engine.submit(GenerateRequest { request_id: "r".into(), prompt_token_ids: vec![5, 6, 7], params, kv_transfer }).unwrap();
        let mut generation = Generation::new(vec![stream], (InFlight::default().enter(), RequestObserver::new(Arc::new(Metrics::new()))));
        let lease = LeaseRelease::new(reqwest::Client::new(), free_url, "42".into());
        let error = generation.await_import(lease).await.unwrap_err();
        assert_eq!((error.status, error.code), (StatusCode::SERVICE_UNAVAILABLE, Some("kv_transfer_failed")), "{error}");
        assert!(error.message.contains("prefill's lease holds 2 blocks, the prompt needs 1"), "{error}");
        let released = tokio::time::timeout(Duration::from_secs(10), freed.recv()).await.expect("a /pd/free call");
        assert_eq!(released.as_deref(), Some("42"));
        engine.shutdown();
    }
}
