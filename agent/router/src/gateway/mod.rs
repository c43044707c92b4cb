//! The HTTP face of the router: OpenAI endpoints behind API keys, a rate limit, a body size
//! limit and input validation, in that order; `/health` and `/metrics` stay open for
//! probes and scrapers.

mod auth;
pub mod inspect;
mod rate_limit;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::watch;

use crate::api_error::ApiError;
use crate::config::RouterConfig;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::workers::WorkerPool;
pub use auth::ApiKeys;
use inspect::{inspect, Endpoint};
pub use rate_limit::RateLimiter;

pub struct Gateway {
    pub keys: ApiKeys,
    pub limiter: Option<RateLimiter>,
    pub max_body_bytes: usize,
    pub session_header: String,
    pub proxy: Proxy,
    pub pool: Arc<WorkerPool>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub etcd_connected: watch::Receiver<bool>,
}

impl Gateway {
    pub fn new(config: &RouterConfig, proxy: Proxy, pool: Arc<WorkerPool>, metrics: Arc<Metrics>, etcd_connected: watch::Receiver<bool>) -> Gateway {
        Gateway {
            keys: ApiKeys::new(&config.api_keys),
            limiter: RateLimiter::new(config.rate_limit_rps),
            max_body_bytes: config.max_request_body_bytes,
            session_header: config.session_header.clone(),
            proxy,
            pool,
            metrics,
            draining: AtomicBool::new(false),
            etcd_connected,
        }
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(gateway)
}

type Peer = ConnectInfo<SocketAddr>;

async fn completions(State(gateway): State<Arc<Gateway>>, peer: Peer, headers: HeaderMap, body: Body) -> Response {
    generate(&gateway, Endpoint::Completions, peer, headers, body).await
}

async fn chat_completions(State(gateway): State<Arc<Gateway>>, peer: Peer, headers: HeaderMap, body: Body) -> Response {
    generate(&gateway, Endpoint::ChatCompletions, peer, headers, body).await
}

async fn generate(gateway: &Gateway, endpoint: Endpoint, ConnectInfo(peer): Peer, headers: HeaderMap, body: Body) -> Response {
    let response = match admit(gateway, &headers, peer, body).await {
        Err(refusal) => refusal.into_response(),
        Ok(body) => match inspect(&body, endpoint) {
            Err(invalid) => invalid.into_response(),
            Ok(facts) => {
                let session_key = header_value(&headers, &gateway.session_header).or(facts.user.as_deref());
                gateway.proxy.forward(endpoint, &facts, body.clone(), session_key).await
            }
        },
    };
    gateway.metrics.client_answer(endpoint.path(), response.status().as_u16());
    response
}

/// Draining, API key, rate limit, body size: everything checked before the body is parsed.
async fn admit(gateway: &Gateway, headers: &HeaderMap, peer: SocketAddr, body: Body) -> Result<Bytes, ApiError> {
    if gateway.draining.load(Ordering::Relaxed) {
        return Err(ApiError::draining());
    }
    authorize(gateway, headers, peer)?;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > gateway.max_body_bytes) {
        return Err(ApiError::body_too_large(gateway.max_body_bytes));
    }
    to_bytes(body, gateway.max_body_bytes).await.map_err(|_| ApiError::body_too_large(gateway.max_body_bytes))
}

fn authorize(gateway: &Gateway, headers: &HeaderMap, peer: SocketAddr) -> Result<(), ApiError> {
    let key = gateway.keys.check(headers)?;
    if let Some(limiter) = &gateway.limiter {
        let client = key.map(str::to_string).unwrap_or_else(|| peer.ip().to_string());
        limiter.acquire(&client, Instant::now()).map_err(ApiError::rate_limited)?;
    }
    Ok(())
}

fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty())
}

/// The union of models served by registered workers.
async fn models(State(gateway): State<Arc<Gateway>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&gateway, &headers, peer.0) {
        return refusal.into_response();
    }
    let snapshot = gateway.pool.snapshot();
    let data: Vec<_> = snapshot
        .models()
        .into_iter()
        .map(|(name, roles)| {
            let created = snapshot
                .workers()
                .filter(|w| w.record.served_model_name == name)
                .map(|w| w.record.started_at / 1000)
                .min()
                .unwrap_or(0);
            let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            json!({"id": name, "object": "model", "created": created, "owned_by": "dlengine", "roles": roles})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let draining = gateway.draining.load(Ordering::Relaxed);
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "workers": gateway.pool.snapshot().len(),
        "etcd_connected": *gateway.etcd_connected.borrow(),
    });
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, Json(body)).into_response()
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], gateway.metrics.encode()).into_response()
}

async fn not_found() -> Response {
    let mut error = ApiError::invalid_request("Unknown route.", None);
    error.status = StatusCode::NOT_FOUND;
    error.into_response()
}
