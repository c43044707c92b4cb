//! What every handler shares: the engine once loaded, the served name, auth, the drain
//! flag, in-flight accounting and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dlengine_cli::ServeArgs;
use dlengine_engine::engine::Engine;

use super::chat_setup::ChatSetup;
use super::pd::Pd;
use super::in_flight::{InFlight, InFlightGuard};
use super::metrics::{Metrics, RequestObserver};
use crate::openai::{ids, ApiError};

/// The loaded engine and what was derived from its tokenizer.
pub struct Ready {
    pub engine: Engine,
    pub chat: ChatSetup,
    pub pd: Pd,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    served_model: String,
    model_root: String,
    created: u64,
    api_key: Option<String>,
    body_limit: usize,
    ready: OnceLock<Ready>,
    draining: AtomicBool,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
}

/// Where the server is in its life, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    Draining,
}

impl AppState {
    pub fn new(args: &ServeArgs) -> Self {
        let served_model = args.served_model_name.clone().unwrap_or_else(|| default_model_name(&args.model));
        Self {
            inner: Arc::new(Inner {
                served_model,
                model_root: args.model.display().to_string(),
                created: ids::unix_now(),
                api_key: args.api_key.clone().filter(|k| !k.is_empty()),
                body_limit: args.max_request_body_bytes,
                ready: OnceLock::new(),
                draining: AtomicBool::new(false),
                in_flight: InFlight::default(),
                metrics: Arc::new(Metrics::new()),
            }),
        }
    }

    pub fn set_ready(&self, ready: Ready) {
        if self.inner.ready.set(ready).is_err() {
            tracing::warn!("the engine was set twice; keeping the first");
        }
    }

    pub fn phase(&self) -> Phase {
        if self.inner.draining.load(Ordering::Acquire) {
            Phase::Draining
        } else if self.inner.ready.get().is_some() {
            Phase::Ready
        } else {
            Phase::Loading
        }
    }

    /// The engine for a new request, or the 503 that says why there is none.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        match (self.phase(), self.inner.ready.get()) {
            (Phase::Ready, Some(ready)) => Ok(ready),
            (Phase::Draining, _) => Err(ApiError::unavailable("the server is shutting down and accepts no new requests")),
            _ => Err(ApiError::unavailable("the model is still loading; retry shortly")),
        }
    }

    pub fn loaded_engine(&self) -> Option<&Engine> {
        self.loaded().map(|r| &r.engine)
    }

    /// The engine and its setup once loaded, draining or not.
    pub fn loaded(&self) -> Option<&Ready> {
        self.inner.ready.get()
    }

    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        if let Some(engine) = self.loaded_engine() {
            engine.begin_drain();
        }
    }

    /// 404 unless `requested` is absent or names the served model.
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(name) if !name.is_empty() && name != self.inner.served_model => {
                Err(ApiError::model_not_found(name, &self.inner.served_model))
            }
            _ => Ok(()),
        }
    }

    pub fn served_model(&self) -> &str {
        &self.inner.served_model
    }

    pub fn model_root(&self) -> &str {
        &self.inner.model_root
    }

    pub fn created(&self) -> u64 {
        self.inner.created
    }

    pub fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }

    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.inner.in_flight
    }

    /// Bookkeeping one generation request carries until it is answered.
    pub fn track_request(&self) -> (InFlightGuard, RequestObserver) {
        (self.inner.in_flight.enter(), RequestObserver::new(self.inner.metrics.clone()))
    }
}

fn default_model_name(dir: &std::path::Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| canonical.display().to_string())
}
